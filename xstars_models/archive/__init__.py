"""Embedding whole collections into one GeoParquet dataset: :func:`embed_collection`
(``XStars.embed_collection``, ``xstars embed-collection``).

A run expands its sources into scenes (:mod:`.sources`: files, COG URLs, STAC Items,
ItemCollections, static Catalogs, STAC API searches), splits each scene into blocks of tile strips, embeds each block
as one task (in this process, or on a Dask cluster: a ``LocalCluster`` it starts, a ``client=``, or
any scheduler by address) into one part file (:mod:`.parts`, written atomically under a
deterministic name: a task that runs twice writes the same bytes) and records finished parts in
the dataset's ``_manifest.json`` (:mod:`.manifest`); a rerun redoes only what is missing. Workers
load the model once each, from the dataset's own copy (``_model``), checked by sha256
(:mod:`.tasks`).
"""

from .manifest import FAILURES, MANIFEST, MapRecord, PartRecord
from .options import ArchiveOptions
from .parts import part_path, read_part_metadata, sensor_folder
from .run import CollectionResult, embed_collection
from .sources import SceneRef, StacSearch, expand_sources

__all__ = [
    "FAILURES", "MANIFEST", "ArchiveOptions", "CollectionResult", "MapRecord", "PartRecord", "SceneRef", "StacSearch",
    "embed_collection", "expand_sources", "part_path", "read_part_metadata", "sensor_folder",
]
