"""The partial output of an unfinished scene run: the writer's data (``<out>.partial``), the
accumulator rows carried into the next strip (``<out>.partial.carry-<strip>.npz``), and the record
(``<out>.partial.json``) of the run's settings and the strips done, which a rerun resumes from.
After a failure a run leaves either these, consistent, or nothing of itself."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError
from ..serialization import atomic_write_bytes
from .failures import add_note, writing

__all__ = ["Partial", "Progress"]

_PARTIAL_FORMAT = "xstars-scene-partial/1"


@dataclass
class Progress:
    """How far a scene has got, counted as the partial run's record counts it.

    Attributes:
        strips_done: rows of tiles finished, earlier (interrupted) calls included.
        skipped: tiles not embedded because of nodata, earlier calls included.
        embedded: tiles embedded by this call.
    """

    strips_done: int = 0
    skipped: int = 0
    embedded: int = 0

    @classmethod
    def resumed(cls, record: dict[str, Any] | None) -> Progress:
        """Where a run starts: from the partial run's ``record``, or from nothing."""
        return cls() if record is None else cls(strips_done=record["strips_done"], skipped=record["skipped"])


class Partial:
    """The files of an unfinished output: the partial data (``<out>.partial``), the accumulator
    rows carried into the next strip, and the sidecar JSON recording the ``settings`` of the run
    (what a resumed run must share with it) and the strips already done."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.base = out.with_name(out.name + ".partial")
        self.json = out.with_name(out.name + ".partial.json")
        self.settings = settings

    def carry(self, strips_done: int) -> Path:
        return self.base.with_name(f"{self.base.name}.carry-{strips_done}.npz")

    def files(self) -> list[Path]:
        return [self.base, self.json, *self.base.parent.glob(self.base.name + ".carry-*.npz")]

    def discard(self) -> None:
        for path in self.files():
            path.unlink(missing_ok=True)

    def load(self, resume: bool) -> dict[str, Any] | None:
        """The recorded progress to resume from, or ``None`` to start over (after discarding any
        partial files: with ``resume=False``, or when there are none or they are unreadable).

        Raises:
            InvalidOptionError: (``field="resume"``) a partial run with other settings, naming them.
        """
        if not resume or not self.json.is_file() or not self.base.is_file():
            self.discard()
            return None
        try:
            record = json.loads(self.json.read_text())
        except (OSError, ValueError):
            self.discard()
            return None
        if record.get("format") != _PARTIAL_FORMAT:
            self.discard()
            return None
        wanted = json.loads(json.dumps(self.settings))
        before = record["settings"]
        changed = sorted(k for k in wanted.keys() | before.keys() if before.get(k) != wanted.get(k))
        if changed:
            details = "; ".join(f"{k}: {_short(before.get(k))} then, {_short(wanted.get(k))} now" for k in changed)
            raise InvalidOptionError(
                f"{self.base} is a partial run with other settings ({details}). Rerun with the same "
                "settings to resume it, or pass {resume} to discard it and start over.",
                field="resume",
                settings={"resume": False},
            )
        return record

    def commit(self, progress: Progress, carry: Path | None) -> None:
        """Record ``progress`` (the strips done and the tiles skipped) with the carry file that the
        next strip starts from, atomically; then remove the carries of earlier strips."""
        record = {
            "format": _PARTIAL_FORMAT,
            "settings": self.settings,
            "strips_done": progress.strips_done,
            "carry": carry.name if carry is not None else None,
            "skipped": progress.skipped,
        }
        data = json.dumps(record, indent=1).encode("utf-8")
        with writing(self.json, len(data)):
            atomic_write_bytes(self.json, data)
        # Carries of earlier strips go only once the record no longer names them.
        for old in self.base.parent.glob(self.base.name + ".carry-*.npz"):
            if carry is None or old.name != carry.name:
                old.unlink(missing_ok=True)

    def keep_resumable(self) -> int:
        """After a failed run: keep what a rerun resumes from (the partial data, its record and
        the carry that the record names) and remove this run's other files (later carries); with
        no record (no strip committed) remove them all, so nothing of the run is left. Returns the
        strips recorded as done: 0 when nothing was kept."""
        try:
            record = json.loads(self.json.read_text())
            done, carry = int(record["strips_done"]), record["carry"]
        except (OSError, ValueError, KeyError, TypeError):
            done, carry = 0, None
        if done < 1 or not self.base.is_file():
            self.discard()
            return 0
        for old in self.base.parent.glob(self.base.name + ".carry-*.npz"):
            if old.name != carry:
                old.unlink(missing_ok=True)
        return done

    def failure_note(self, kept: int, strips: int) -> str:
        """What a failed run left (``kept`` of ``strips`` strips, from :meth:`keep_resumable`),
        for the end of its error message."""
        if kept == 0:
            return "Nothing of this run was kept."
        return (f"{kept} of {strips} strips are kept in {self.base} with their record {self.json.name}; once the "
                "cause is fixed, rerun with the same settings to resume from there.")

    @contextlib.contextmanager
    def finishing(self, out: Path, strips: int) -> Iterator[None]:
        """Around the final copy of all ``strips`` strips into ``out``: its error says that the
        partial data is kept for a rerun."""
        try:
            yield
        except BaseException as err:
            add_note(err, f"All {strips} strips are kept in {self.base} with their record {self.json.name}; once "
                          f"the cause is fixed, rerun with the same settings to write {out.name} from them.")
            raise


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."

