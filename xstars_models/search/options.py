"""The options of a search (:func:`~xstars_models.search.search`, ``xstars search``): how many hits,
which rows may be hits, and how the dataset's index is built. Built and checked once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..devices import check_device
from ..errors import InvalidOptionError, InvalidTypeError, UnknownOptionError

__all__ = ["SearchOptions"]


@dataclass(frozen=True)
class SearchOptions:
    """How to search a dataset of tile embeddings.

    Attributes:
        k: hits to return (fewer only when fewer rows pass ``where``).
        where: which rows may be hits, applied before ranking: a filter in the small SQL subset
            of :func:`~xstars_models.search.parse_where` (``"sensor = 'aerial' AND datetime >=
            '2024-06-01'"``, ``"bbox(13.3, 52.4, 13.5, 52.6)"``) or a ``pyarrow.compute``
            expression over the dataset's columns. ``None``: every row, of every sensor.
        whiten: rank in the model's whitened space (its fitted whitening removes each sensor's
            own mean and shares one PCA whitening, so tiles of different sensors compare); rows
            stored whitened are used as they are. ``False`` ranks the stored vectors as they are,
            which compares tiles of one sensor only.
        exact_max_rows: datasets of up to this many rows get an exact index (inner product over
            every vector: the true nearest neighbours); larger ones an IVF-PQ index (approximate,
            96 bytes a 192-d vector instead of 768; its recall@10 against exact is measured on a
            sample when it is built).
        nprobe: clusters an IVF-PQ index scans per query (more: closer to exact, slower).
        recall_queries: rows of the dataset used as queries to measure an IVF-PQ index's
            recall@10 against exact search when it is built.
        device: where a query image is embedded (``"cpu"``, ``"cuda[:N]"``, ``"mps"``,
            ``"auto"``); ``None``: where the model is. The index is searched on the CPU.
    """

    k: int = 10
    where: Any = None
    whiten: bool = True
    exact_max_rows: int = 1_000_000
    nprobe: int = 16
    recall_queries: int = 200
    device: str | None = None

    def __post_init__(self) -> None:
        for name, least in (("k", 1), ("exact_max_rows", 1), ("nprobe", 1), ("recall_queries", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InvalidOptionError(
                    f"{{{name}}} must be a whole number >= {least}.", field=name, settings={name: value}
                )
        if not isinstance(self.whiten, bool):
            raise InvalidTypeError(f"whiten must be True or False, got {self.whiten!r}.", field="whiten")
        if self.device is not None:
            check_device(self.device)  # a device this machine lacks is refused before any work
        if self.where is not None:
            from .where import as_expression

            as_expression(self.where)  # a bad filter is refused before any work

    @classmethod
    def from_call(cls, options: SearchOptions | None, keywords: Mapping[str, Any] | None = None) -> SearchOptions:
        """``options`` (default: all defaults) with the keywords replacing its values.

        Raises:
            UnknownOptionError: a keyword that is not a field (``field``: that keyword).
            InvalidOptionError: a bad value (``field``: its name).
        """
        keywords = dict(keywords or {})
        if options is not None and not isinstance(options, cls):
            raise InvalidTypeError(f"options must be a SearchOptions, got {type(options).__name__}.", field="options")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(keywords.keys() - names)
        if unknown:
            raise UnknownOptionError(
                f"search() got an unexpected keyword argument {unknown[0]!r}; its options are {', '.join(sorted(names))}.",
                field=unknown[0],
            )
        options = options or cls()
        return dataclasses.replace(options, **keywords) if keywords else options
