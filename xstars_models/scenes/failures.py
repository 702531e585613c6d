"""Why a scene's input could not be read or its output written, in one line. GDAL reports both as
"Read failed." / "Write failed. See previous exception for details." and keeps the operating
system's error (a full disk) in the exceptions chained below, in its log, or nowhere; this finds
it (the chain, GDAL's logged messages, then the free space on the disk) and names it with the file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import InputReadError, OutputWriteError, XStarsError

# Operating-system errors a write can end with, in the order their messages are looked for in
# GDAL's text (libtiff logs "_tiffWriteProc: No space left on device." and nothing more).
_WRITE_ERRNOS = tuple(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO)
    if code is not None
)


def chain_messages(err: BaseException) -> list[str]:
    """The messages of ``err`` and of the exceptions it was raised from, outermost first, each on
    one line, without GDAL's pointers to them ("See previous exception for details") and repeats."""
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = " ".join(str(current).split())
        if text and "See previous exception" not in text and text not in texts:
            texts.append(text)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return texts


def _errno_of(err: BaseException | None) -> int | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def _errno_in(texts: Sequence[str]) -> int | None:
    for code in _WRITE_ERRNOS:
        wanted = os.strerror(code).lower()
        if any(wanted in text.lower() for text in texts):
            return code
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_error(err: BaseException | None, path: Path, needed: int, logged: Sequence[str] = ()) -> OutputWriteError:
    """The :class:`OutputWriteError` for a failed write of about ``needed`` bytes to ``path``: the
    operating system's error (from ``err``'s chain, else GDAL's ``logged`` messages, else a disk
    with less than ``needed`` bytes free: ENOSPC), or failing that the messages themselves."""
    texts = [*(chain_messages(err) if err is not None else []), *(" ".join(m.split()) for m in logged)]
    code = _errno_of(err) or _errno_in(texts)
    how = ""
    if code is None:
        free = _free_bytes(path.parent)
        if free is not None and free < needed:
            code, how = errno.ENOSPC, f": {free} bytes free on the disk holding {path.parent}, {needed} needed"
    if code is not None:
        message = f"{os.strerror(code)} ({errno.errorcode.get(code, str(code))}{how}) while writing {path}."
    else:
        message = f"Could not write {path}: {'; '.join(dict.fromkeys(texts)) or 'the writer gave no reason'}."
    return OutputWriteError(message, errno=code, filename=str(path), field="out")


class GdalLog(logging.Handler):
    """GDAL's messages that rasterio logs (rather than raises) in this thread while a write runs:
    what a failed flush or close reports, e.g. libtiff's "No space left on device"."""

    def __init__(self, path: Path, needed: int) -> None:
        super().__init__(logging.WARNING)
        self.path, self.needed = path, needed
        self.messages: list[str] = []
        self.failed = False
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:  # not the reads of the next strip, in another thread
            self.messages.append(record.getMessage())
            self.failed = self.failed or record.levelno >= logging.ERROR

    def check(self, missing: int = 0) -> None:
        """Raise the :class:`OutputWriteError` of a write that GDAL only logged as failed, or that
        left ``missing`` bytes of the file unwritten."""
        if self.failed or missing > 0:
            raise write_error(None, self.path, missing or self.needed, self.messages)


@contextlib.contextmanager
def writing(path: Path, needed: int) -> Iterator[GdalLog]:
    """Run a write of about ``needed`` bytes to ``path``: an ``OSError`` it raises leaves as an
    :class:`OutputWriteError` naming the cause (:func:`write_error`). Yields the :class:`GdalLog`
    of the write, for the block to :meth:`~GdalLog.check` after closing a GDAL file; its messages
    are not printed, as the error names them."""
    log = GdalLog(path, needed)
    logger = logging.getLogger("rasterio")
    logger.addHandler(log)
    try:
        yield log
    except XStarsError:
        raise
    except io_errors() as err:
        raise write_error(err, path, needed, log.messages) from err
    finally:
        logger.removeHandler(log)


def io_errors() -> tuple[type[Exception], ...]:
    """What a failed read or write raises: ``OSError`` and rasterio's errors, including GDAL's
    own (``CPLE_*``, which a failed copy raises as they are) when rasterio is installed."""
    try:
        from rasterio._err import CPLE_BaseError
        from rasterio.errors import RasterioError
    except ImportError:
        return (OSError,)
    return (OSError, RasterioError, CPLE_BaseError)


def read_error(err: BaseException, what: str, rows: tuple[int, int], hint: str) -> InputReadError:
    """The :class:`InputReadError` for a failed read of input rows ``rows`` (first, last) of
    ``what``: the deepest message of ``err``'s chain (GDAL's root cause: "TIFFFillTile: Read error
    at row 128 ...; got 1194 bytes, expected 6588") and ``hint`` (what to check)."""
    texts = chain_messages(err)
    cause = texts[-1] if texts else type(err).__name__
    return InputReadError(f"Read error at rows {rows[0]}-{rows[1]} of {what}: {cause}{hint}", field="source")


def add_note(err: BaseException, note: str) -> None:
    """Append ``note`` (what the failed run left on disk) to the message of a read or write error
    of this module; other exceptions keep theirs."""
    if isinstance(err, (InputReadError, OutputWriteError)) and err.args:
        err.args = (f"{err.args[0]} {note}", *err.args[1:])
