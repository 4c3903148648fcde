"""Alembic migrations of the hub store, installed as ``agentmesh.migrations``.

The repository keeps them at the top level (``migrations/``, next to
``alembic.ini``); ``pyproject.toml`` maps this directory to the package
``agentmesh.migrations`` so an installed hub can upgrade its database from any
working directory (see :meth:`agentmesh.hub.store.HubStore.ensure_schema`).
"""
