"""Output paths that would destroy an input or an earlier result. Checked before any work, by every
function and command that writes results: an output that is one of the local files the run reads
(:func:`refuse_input_as_output`) or, as far as can be told, the file a URL it reads is served
from (:func:`refuse_served_output`); an output that exists, unless replacing it was asked for
(:func:`refuse_existing_output`, rasterio's ``rio --overwrite`` convention). That two runs never
write one output at once is :mod:`.lock`'s business."""

from __future__ import annotations

import http.client
import os
import urllib.request
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from ..errors import InvalidOptionError
from .network import network_limits

__all__ = ["refuse_existing_output", "refuse_input_as_output", "refuse_served_output"]


def refuse_input_as_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], field: str = "out") -> None:
    """Refuse an output path ``out`` that is one of ``inputs``: the same path, a symbolic link to
    it (either way), or another hard link to the same file.

    Args:
        out: where results would be written.
        inputs: files that are read; ones that do not exist are ignored.
        field: the argument that gives ``out`` (the command line names it by its flag).

    Raises:
        InvalidOptionError: (``field``) naming the output and the input it is.
    """
    out_path = Path(out)
    target = out_path.resolve()
    for item in inputs:
        path = Path(item)
        same = path.resolve() == target or (
            out_path.exists() and path.exists() and os.path.samefile(out_path, path)
        )
        if same:
            raise InvalidOptionError(
                f"{{{field}}} is the input {path}"
                + (f" (both are {target})" if str(target) not in (str(out_path), str(path)) else "")
                + "; writing there would replace the input with the results. Choose another output path. "
                "Nothing was done.",
                field=field,
                settings={field: str(out_path)},
            )


def refuse_served_output(out: str | os.PathLike, urls: Iterable[str], field: str = "out") -> None:
    """Refuse an existing output ``out`` that an ``http(s)://`` input in ``urls`` is probably
    served from: one whose file name is the URL's and whose size in bytes is the one the server
    reports (``Content-Length`` of a ``HEAD`` request).

    That is all that can be told of a URL: a server does not say which file it serves, so an
    output that a URL is served from under another name, or that another host serves, is not
    caught. A URL whose name differs is not asked; one whose server does not answer the ``HEAD``
    within one request's network limit (:mod:`.network`) counts as no match, since the run then
    fails reading it anyway.

    Raises:
        InvalidOptionError: (``field``) naming the output and the URL.
    """
    out_path = Path(out)
    if not out_path.is_file():
        return
    names = {out_path.name, out_path.resolve().name}
    size = out_path.stat().st_size
    for url in urls:
        if PurePosixPath(unquote(urlsplit(url).path)).name not in names:
            continue
        if _served_size(url) == size:
            raise InvalidOptionError(
                f"{{{field}}} has the name and the size ({size} bytes) of the input {url}, so it is probably "
                "the file served there; writing there would replace the input with the results. Choose another "
                "output path. Nothing was done.",
                field=field,
                settings={field: str(out_path)},
            )


def _served_size(url: str) -> int | None:
    """The ``Content-Length`` of a ``HEAD`` of ``url`` (one attempt within the network limit), or
    ``None`` when the server does not say."""
    timeout = network_limits().timeout_s
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.headers["Content-Length"])
    # No answer, an HTTP error or a garbled one, no Content-Length or a bad one.
    except (OSError, http.client.HTTPException, ValueError, TypeError):
        return None


def refuse_existing_output(out: str | os.PathLike, overwrite: bool, field: str = "out") -> None:
    """Refuse to replace an existing ``out`` unless ``overwrite`` (rasterio's ``rio`` convention).
    The partial files of a resumable run (``<out>.partial``...) are not ``out``.

    Raises:
        InvalidOptionError: (``field``) naming the output; the message names ``overwrite``.
    """
    path = Path(out)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    raise InvalidOptionError(
        f"{path} exists; pass {{overwrite}} to replace it, or choose another output path. Nothing was done.",
        field=field,
        settings={"overwrite": True},
    )
