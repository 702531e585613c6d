"""The work behind ``XStars.adapt``, ``embed_scene``, ``push_to_hub``, ``save_adapter`` and
``load_adapter``, filled into :mod:`xstars_models.model` from above.

Those functions live in layers that use the model (training, scenes, publish, adapters), so the
model module cannot import them without a cycle; this module sits above both and hands them to
the model's methods. The package's ``__init__`` imports it, so the methods work as soon as
``xstars_models`` (or any module of it) is imported."""

from __future__ import annotations

from .adapters import load_adapter, save_adapter
from .model import register_workflows
from .publish import push_to_hub
from .scenes import embed_scene
from .training import adapt

register_workflows(
    adapt=adapt,
    embed_scene=embed_scene,
    load_adapter=load_adapter,
    push_to_hub=push_to_hub,
    save_adapter=save_adapter,
)
