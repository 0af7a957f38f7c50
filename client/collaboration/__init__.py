"""Collaborative training: many clients, each with its own data, train one set of parameters together."""

from client.collaboration.optimizer import CollaborationError, CollaborationProgress, CollaborativeOptimizer

__all__ = ["CollaborationError", "CollaborationProgress", "CollaborativeOptimizer"]
