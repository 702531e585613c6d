"""Searching a dataset of tile embeddings across sensors: :func:`search` (``xstars search``,
``XStars.search``) and :class:`SearchIndex` for many queries on one dataset.

A dataset is an ``embed_collection`` folder or a folder of ``embed_scene(output="cls")`` files
(:mod:`.dataset`). Its vectors are ranked by cosine similarity in the model's whitened space
(:mod:`.space`), so an aerial chip finds Sentinel-2 tiles and the reverse, with a FAISS index kept
beside the dataset in ``_index/`` and checked against it before each search (:mod:`.store`,
:mod:`.faiss_index`). A query is an image, a point or a tile of the dataset (:mod:`.query`);
``where`` narrows the candidates before ranking (:mod:`.where`); the hits come back as a table,
GeoParquet or GeoJSON (:mod:`.hits`). Needs the ``archive`` extra (FAISS, pyarrow, shapely).
"""

from .options import SearchOptions
from .query import SearchIndex, SearchResult, search
from .store import IndexReport
from .where import parse_where

__all__ = ["IndexReport", "SearchIndex", "SearchOptions", "SearchResult", "parse_where", "search"]
