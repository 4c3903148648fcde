"""Byte formats: the codec, the end-to-end envelope, message payloads and hub frames.

Bytes in, values out, with strict parsing (:class:`~agentmesh.errors.DecodeError`
for anything malformed). This package sits below ``crypto/`` and ``protocol/``:
it imports only :mod:`agentmesh.errors` and :mod:`agentmesh.ids`, and it never
performs I/O.
"""
