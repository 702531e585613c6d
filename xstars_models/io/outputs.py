"""Output paths that would destroy an input. Checked before any work, by every function and
command that writes results beside the files it reads."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import InvalidOptionError

__all__ = ["refuse_input_as_output"]


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
