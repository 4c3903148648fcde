"""I/O-free protocol state machines, and the interface between agents and hubs.

``hub_protocol`` holds the client and server connection state machines over
the frames of :mod:`agentmesh.wire.frames`; ``client_session`` the client's
session across connections (login order, send window, acks, verdicts) that
the network hub client drives; ``hub_interface`` the typing protocols an agent
and a hub call each other through. Nothing under
``agentmesh.protocol`` performs I/O or imports asyncio, socket or sqlalchemy:
bytes go in, events and bytes come out. It sits above ``crypto/`` and
``wire/`` and below the agent and the hubs.
"""
