"""Reading a JSON file (a model's ``config.json``, a manifest, a sensor spec, a training config)
with one error for text that is not JSON, of the kind the caller says, naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, XStarsError

__all__ = ["read_json"]


def read_json(
    path: str | os.PathLike[str],
    data: bytes | None = None,
    *,
    error: type[XStarsError] = ConfigError,
    where: str | None = None,
    field: str | None = None,
) -> Any:
    """The parsed contents of the JSON file ``path``, or of ``data`` when its bytes were already
    read (and checked against a sha256). Text that is not JSON raises ``error`` (with ``field``)
    naming the file as ``where`` (default: the path); a missing file raises FileNotFoundError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") if data is None else data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{where or path}: not valid JSON ({err}).", field=field) from None
