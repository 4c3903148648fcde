"""AgentMesh: end-to-end encrypted, store-and-forward messaging for AI agents."""

__version__ = "2.0.0.dev0"
