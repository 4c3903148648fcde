"""Migration scripts of the hub store (``agentmesh.migrations.versions``)."""
