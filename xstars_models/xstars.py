"""``XStars``, the class users hold: :class:`~.model.XStarsBase` (loading, saving, ``embed``) plus the
methods whose work lives in the layers that use a model: ``adapt`` (training), ``embed_scene``
(scenes), ``push_to_hub`` (publish) and the adapter files (adapters).

Those layers take an :class:`~.model.XStarsBase` and return the same class they were given (a
copy of an ``XStars`` is an ``XStars``), so this class sits above them all and each method is a
plain call into the layer that owns the work."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .adapters import load_adapter, save_adapter
from .archive import ArchiveOptions, CollectionResult, StacSearch, embed_collection
from .config import FileRecord
from .export import export_onnx
from .model import XStarsBase
from .publish import push_to_hub
from .scenes import SceneOptions, SceneResult, embed_scene
from .search import SearchResult, search
from .sensors import SensorSpec
from .training import adapt

__all__ = ["XStars"]


class XStars(XStarsBase):
    """A cross-sensor X-STARS encoder: one ViT trunk, one input stem per sensor.

    Create one with :meth:`from_pretrained` (registry id, Hub repo or folder) or :meth:`new`
    (random weights, for training). ``lineage``, ``training_record`` and ``metrics`` are free-form
    records saved in ``config.json`` and shown in model cards. ``whitening`` (a
    :class:`~.whitening.GlobalWhitening` or ``None``) is what ``embed(..., whiten=True)`` applies;
    it holds for the weights it was fit on, so training drops it.
    """

    def save_adapter(self, sensor: str, path: str | Path, mode: str | None = None) -> FileRecord:
        """Save what adapting to ``sensor`` added (its stem, and LoRA updates in ``"lora"`` mode)
        as one small file naming the base model; see :func:`xstars_models.adapters.save_adapter`."""
        return save_adapter(self, sensor, path, mode)

    @classmethod
    def load_adapter(
        cls, path: str | Path, base: XStars | None = None, expected_sha256: str | None = None, **kwargs: Any
    ) -> XStars:
        """A base model with an adapter file applied (the base is loaded from the id and revision
        the adapter records unless given); see :func:`xstars_models.adapters.load_adapter`."""
        return load_adapter(path, base, expected_sha256, model_class=cls, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        revision: str | None = None,
        commit_message: str = "Upload X-STARS model",
        token: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Upload config, weights and a generated model card to ``repo_id`` in one commit and
        return the commit id; see :func:`xstars_models.publish.push_to_hub` for the options
        (``license``, ``description``, ``manifest_path``, ``model_id``)."""
        return push_to_hub(self, repo_id, private, revision, commit_message, token, **kwargs)

    def adapt(self, new_sensor: SensorSpec, pairs: Any, **kwargs: Any) -> XStars:
        """Continual pretraining to ``new_sensor`` (MSAD against a frozen copy of this model, plus
        DINO); see :func:`xstars_models.training.adapt` for the options. This model is unchanged."""
        return adapt(self, new_sensor, pairs, **kwargs)

    def embed_scene(
        self,
        source: str | Path | np.ndarray | Any,
        sensor: str,
        out: str | Path | None = None,
        *positional: Any,
        options: SceneOptions | None = None,
        **kwargs: Any,
    ) -> SceneResult:
        """Embed a whole scene (a GeoTIFF path, an ``http(s)://`` COG URL, a STAC Item or a
        C x H x W array of the sensor's digital numbers) tile by tile with bounded memory, into a
        georeferenced feature-map Cloud-Optimised GeoTIFF (``output="map"``) or a GeoParquet file
        of one vector per tile with its footprint (``"cls"``); needs the ``geo`` extra (rasterio).

        The options (``tile`` and ``overlap`` in pixels at the sensor's GSD, ``output``,
        ``batch_size``, ``device``, ``resample``, ``max_nodata``, ``precision``, ``whiten``...) are
        the fields of :class:`~xstars_models.scenes.SceneOptions`: pass one as ``options=``, or the
        fields by keyword (replacing those of ``options``); ``tile, overlap, output, batch_size,
        device`` may also come positionally after ``out``. See
        :func:`xstars_models.scenes.embed_scene` for the GSD check, nodata and resuming."""
        return embed_scene(self, source, sensor, out, *positional, options=options, **kwargs)

    def embed_collection(
        self,
        sources: Iterable[str | os.PathLike[str] | StacSearch],
        sensor: str,
        out: str | os.PathLike[str],
        options: ArchiveOptions | None = None,
        **kwargs: Any,
    ) -> CollectionResult:
        """Embed every scene ``sources`` names (GeoTIFFs, COG URLs, STAC Items, ItemCollections,
        Catalogs or :class:`~xstars_models.archive.StacSearch` API searches) into the GeoParquet
        dataset folder ``out``, one row per tile, resumable; in this process or on a Dask cluster
        (``workers=``, ``scheduler=``, ``client=``). Options: the fields of
        :class:`~xstars_models.archive.ArchiveOptions` and of
        :class:`~xstars_models.scenes.SceneOptions`, by keyword or as ``options=``; see
        :func:`xstars_models.archive.embed_collection`."""
        return embed_collection(self, sources, sensor, out, options, **kwargs)

    def search(self, dataset: str | os.PathLike[str], **kwargs: Any) -> SearchResult:
        """The tiles of ``dataset`` (an ``embed_collection`` folder, or a folder of
        ``embed_scene(output="cls")`` files, embedded by this model) most like one query, across
        sensors: ``image=`` with ``sensor=``, ``near=(lon, lat)`` or ``like=(scene_id, row, col)``,
        with ``k``, ``where``...; see :func:`xstars_models.search.search`."""
        return search(dataset, model=self, **kwargs)

    def export_onnx(
        self, path: str | Path, sensor: str, output: str = "cls", opset: int | None = None, **kwargs: Any
    ) -> FileRecord:
        """Write this model for ``sensor`` as an ONNX file whose input is the sensor's raw digital
        numbers (B x C x H x W, float32 or ``input_dtype=`` ``"uint8"``/``"uint16"``; dynamic batch
        and size in whole patches) and whose output is ``output`` (``"cls"``, ``"mean"`` or
        ``"map"``); see :func:`xstars_models.export.export_onnx` for ``size``, ``int8``,
        ``input_dtype``, ``overwrite`` (an existing file is refused without it) and the metadata."""
        return export_onnx(self, path, sensor, output, opset, **kwargs)
