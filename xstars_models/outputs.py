"""Output paths that would destroy an input. Checked before any work, by every function and
command that writes results beside the files it reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

__all__ = ["refuse_input_as_output"]


def refuse_input_as_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str = "out") -> None:
    """Raise ``ValueError`` when the output path ``out`` is one of ``inputs``: the same path, a
    symbolic link to it (either way), or another hard link to the same file.

    Args:
        out: where results would be written.
        inputs: files that are read; ones that do not exist are ignored.
        flag: how the caller names the output (``"out"``, ``"--out"``), for the message.
    """
    out_path = Path(out)
    target = out_path.resolve()
    for item in inputs:
        path = Path(item)
        same = path.resolve() == target or (
            out_path.exists() and path.exists() and os.path.samefile(out_path, path)
        )
        if same:
            raise ValueError(
                f"{flag} {out_path} is the input {path}"
                + (f" (both are {target})" if str(target) not in (str(out_path), str(path)) else "")
                + "; writing there would replace the input with the results. Choose another output path. "
                "Nothing was done."
            )
