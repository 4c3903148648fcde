"""Wire formats and I/O-free protocol state machines.

Nothing under ``agentmesh.protocol`` performs I/O or imports asyncio, socket
or sqlalchemy: bytes go in, events and bytes come out.
"""
