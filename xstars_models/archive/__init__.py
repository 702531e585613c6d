"""Embedding whole collections (in progress, issue #28): the scenes a run's sources name
(:mod:`.sources`)."""

from .sources import SceneRef, expand_sources

__all__ = ["SceneRef", "expand_sources"]
