"""Hubs: the in-process LocalHub, the network client and server, and the SQL store."""
