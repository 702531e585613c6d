"""A dataset's index, kept beside it in ``DATASET/_index/``: ``index.faiss`` (the FAISS index) and
``index.json`` (its record: the space it was built in, its kind and recall, the file's sha256 and
size, and every part it covers in id order, with the part's size, modification time, sha256 and
rows).

Each search checks the record against the dataset before trusting the index:

* no index, a record for another space (model, whitening), or an index of the wrong kind for the
  dataset's size now: built;
* a part it covers that changed (size or time differ and so does its sha256) or is gone: rebuilt;
* parts it does not cover yet: their rows are added (the index is updated, not rebuilt);
* an index file that does not match its record, or that FAISS cannot read: rebuilt, with a
  warning (it is never trusted).

Both files are written under temporary names and renamed (the index first, the record last),
under a lock (``index.json.lock``): readers see a whole index or none, and two searches never
build at once (the second is refused with :class:`~xstars_models.errors.OutputLockedError`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError, user_stacklevel
from ..io.lock import output_lock
from ..serialization import atomic_path, atomic_write_bytes, file_record
from .dataset import EmbeddingDataset, Part
from .faiss_index import FLAT, IVFPQ, Built, add_vectors, build_index, import_faiss
from .options import SearchOptions
from .space import Space

__all__ = ["INDEX_FOLDER", "IndexReport", "OpenIndex", "open_index"]

INDEX_FOLDER = "_index"
INDEX_FILE = "index.faiss"
RECORD = "index.json"
FORMAT, VERSION = "xstars-search-index", 1


@dataclass(frozen=True)
class IndexReport:
    """What a search did with the dataset's index.

    Attributes:
        action: ``"loaded"`` (up to date), ``"built"``, ``"updated"`` (rows of new parts added)
            or ``"rebuilt"``.
        reason: why it was built, updated or rebuilt (empty when loaded).
        rows: rows the index holds.
        parts: parts it covers.
        built: how it was built (kind, IVF-PQ's shape and measured recall@10, seconds).
    """

    action: str
    reason: str
    rows: int
    parts: int
    built: Built

    def describe(self) -> str:
        """One line: the action, the kind, and IVF-PQ's recall."""
        kind = "exact (inner product over every vector)" if self.built.kind == FLAT else \
            "IVF-PQ ({nlist} clusters, {m} bytes a vector)".format(**self.built.params)
        text = f"index {self.action}: {kind}, {self.rows} rows of {self.parts} parts"
        if self.reason:
            text += f" ({self.reason})"
        if self.built.recall_at_10 is not None:
            text += (f"; recall@10 against exact search {self.built.recall_at_10:.3f} on {self.built.recall_queries} "
                     "sampled rows")
        return text + (f"; built in {self.built.seconds:.1f} s" if self.action != "loaded" else "")


@dataclass
class OpenIndex:
    """A dataset's index, ready to search.

    Attributes:
        index: the FAISS index (ids: row positions).
        parts: the parts it covers, in id order.
        offsets: the first id of each part, and the total rows last (``len(parts) + 1``).
        report: what was done to get it.
    """

    index: Any
    parts: list[Part]
    offsets: np.ndarray
    report: IndexReport


def open_index(dataset: EmbeddingDataset, space: Space, options: SearchOptions) -> OpenIndex:
    """The up-to-date index of ``dataset`` in ``space``: loaded, updated or (re)built (see the
    module's notes).

    Raises:
        InvalidInputError: (``field="dataset"``) a dataset without rows.
        OutputLockedError: (``field="dataset"``) another process is building its index.
    """
    store = _Store(dataset, space, options)
    found = store.load()
    if isinstance(found, OpenIndex):
        return found
    with output_lock(store.folder / RECORD, field="dataset"):
        found = store.load(warn=False)  # another process may have finished it meanwhile
        return found if isinstance(found, OpenIndex) else store.make(*found)


class _Store:
    def __init__(self, dataset: EmbeddingDataset, space: Space, options: SearchOptions) -> None:
        self.dataset, self.space, self.options = dataset, space, options
        self.folder = dataset.root / INDEX_FOLDER

    def load(self, warn: bool = True) -> OpenIndex | tuple[str, str, Any, dict[str, Any] | None]:
        """The index when it is up to date, else (action, reason, index to update or None,
        record)."""
        path = self.folder / RECORD
        if not path.exists():
            return "built", "", None, None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("format") != FORMAT or record.get("version") != VERSION:
                raise ValueError(f"not format {FORMAT!r} version {VERSION}")
            missing = {"space", "built", "rows", "parts", "file"} - set(record)
            if missing:
                raise ValueError(f"no {', '.join(sorted(missing))}")
        except (OSError, ValueError, AttributeError) as err:
            return self._corrupt(f"{path} is unreadable ({err})", warn)
        if record["space"] != self.space.key:
            return "rebuilt", "it was built for another model, whitening or whiten setting", None, None
        current = {p.name: p for p in self.dataset.parts}
        for entry in record["parts"]:
            part = current.get(entry["path"])
            if part is None or not _unchanged(part.path, entry):
                return "rebuilt", f"part {entry['path']} was {'removed' if part is None else 'changed'}", None, None
        new = [p for name, p in current.items() if name not in {e["path"] for e in record["parts"]}]
        rows = record["rows"] + sum(self.dataset.rows(p) for p in new)
        if self._kind(rows) != record["built"]["kind"]:
            return "rebuilt", f"{rows} rows now take an {'exact' if self._kind(rows) == FLAT else 'IVF-PQ'} index", \
                None, None
        file = self.folder / INDEX_FILE
        try:
            found = file_record(file) if file.exists() else None
            if found is None or (found.size, found.sha256) != (record["file"]["size"], record["file"]["sha256"]):
                raise ValueError("its size or sha256 differs from its record's")
            index = import_faiss().read_index(str(file))
            if index.ntotal != record["rows"]:
                raise ValueError(f"it holds {index.ntotal} rows, its record {record['rows']}")
        except (OSError, ValueError, RuntimeError) as err:  # FAISS reports a damaged file as RuntimeError
            return self._corrupt(f"{file} is damaged: {err}", warn)
        if new:
            return "updated", f"{len(new)} new parts", index, record
        return self._open(index, record, IndexReport("loaded", "", record["rows"], len(record["parts"]),
                                                     Built(**record["built"])))

    def _corrupt(self, what: str, warn: bool) -> tuple[str, str, None, None]:
        if warn:
            warnings.warn(f"{what}; the index is rebuilt and not trusted.", UserWarning, stacklevel=user_stacklevel())
        return "rebuilt", "the old one was damaged", None, None

    def _kind(self, rows: int) -> str:
        return FLAT if rows <= self.options.exact_max_rows else IVFPQ

    def make(self, action: str, reason: str, index: Any, record: dict[str, Any] | None) -> OpenIndex:
        """Build (or update ``index`` of ``record``), save, and open it."""
        dataset = self.dataset
        covered = [] if record is None else record["parts"]
        done = {e["path"] for e in covered}
        todo = [p for p in dataset.parts if p.name not in done]
        entries: list[dict[str, Any]] = [
            {"path": p.name, **_stat(p.path), "sha256": file_record(p.path).sha256, "rows": dataset.rows(p)} for p in todo
        ]
        expected = [int(e["rows"]) for e in entries]

        def chunks() -> Any:
            for part, rows in zip(todo, expected):
                vectors = dataset.vectors(part)
                if len(vectors) != rows:
                    raise InvalidInputError(f"{part.path} changed while it was indexed; search again once the run "
                                            "writing the dataset has finished.", field="dataset")
                if rows:
                    yield self.space.index_vectors(vectors, part.sensor, part.whitened)

        if index is None:
            total = sum(expected)
            if total == 0:
                raise InvalidInputError(f"{dataset.root} has no rows to search.", field="dataset")
            dim = next(len(dataset.vectors(p)[0]) for p, rows in zip(todo, expected) if rows)
            index, built = build_index(chunks, total, dim, self._kind(total), nprobe=self.options.nprobe,
                                       recall_queries=self.options.recall_queries)
        else:
            assert record is not None
            built = Built(**record["built"])
            add_vectors(index, chunks())
        record = {"format": FORMAT, "version": VERSION, "space": self.space.key, "built": asdict(built),
                  "rows": int(index.ntotal), "parts": covered + entries}
        self.folder.mkdir(exist_ok=True)
        with atomic_path(self.folder / INDEX_FILE) as tmp:
            import_faiss().write_index(index, str(tmp))
            written = file_record(tmp)
            record["file"] = {"size": written.size, "sha256": written.sha256}
        atomic_write_bytes(self.folder / RECORD, (json.dumps(record, indent=1) + "\n").encode())
        reason = reason or ("no index yet" if action == "built" else "")
        return self._open(index, record, IndexReport(action, reason, record["rows"], len(record["parts"]), built))

    def _open(self, index: Any, record: dict[str, Any], report: IndexReport) -> OpenIndex:
        by_name = {p.name: p for p in self.dataset.parts}
        parts = [by_name[e["path"]] for e in record["parts"]]
        offsets = np.concatenate([[0], np.cumsum([e["rows"] for e in record["parts"]])]).astype(np.int64)
        return OpenIndex(index, parts, offsets, report)


def _stat(path: Path) -> dict[str, int]:
    found = path.stat()
    return {"size": found.st_size, "mtime_ns": found.st_mtime_ns}


def _unchanged(path: Path, entry: dict[str, Any]) -> bool:
    """The part file is the one indexed: same size and time, or else the same sha256."""
    found = _stat(path)
    if found == {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}:
        return True
    return found["size"] == entry["size"] and file_record(path).sha256 == entry["sha256"]


