"""The MSC-France layout of the X-STARS paper: ``root/{sensor}/{city}/{tile}.png``, the same tile
names across sensors, one ground footprint per name."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import InvalidInputError, InvalidOptionError

__all__ = ["MSCFrancePairs"]

_LAYOUT = "root/{sensor}/{city}/{tile}.png"
UNPAIRED = ("error", "skip")


class MSCFrancePairs(Dataset):
    """Tiles of the same footprint seen by several sensors, paired by city and tile name.

    Items: ``{"images": {sensor: float32 C x H x W digital numbers}, "city": str, "tile": str}``
    (8-bit PNGs, so DNs in 0-255; not normalised).

    Args:
        root: the ``MSC-France`` folder.
        sensors: sensor folder names under ``root`` (``"SPOT"``, ``"Sentinel"``, ``"Landsat"``).
        cities: city folders to use (default: every city folder of any sensor).
        transform: called on each item's ``images`` dict; its result replaces it.
        sensor_names: folder name -> the name the model uses for that sensor, e.g.
            ``{"SPOT": "spot67_rgb", "Sentinel": "sentinel2_rgb"}``; unlisted folders keep their
            own name. The keys of ``images`` are these names.
        unpaired: ``"error"`` (default) when a tile is missing for some sensor, or ``"skip"`` to
            leave such tiles out (they are listed in :attr:`skipped`).
        mode: PIL mode every PNG is converted to (``"RGB"``, as the official code reads them);
            ``None`` keeps the bands as stored.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        sensors: Sequence[str] = ("SPOT", "Sentinel"),
        cities: Sequence[str] | None = None,
        transform: Callable[[dict[str, torch.Tensor]], Any] | None = None,
        *,
        sensor_names: Mapping[str, str] | None = None,
        unpaired: str = "error",
        mode: str | None = "RGB",
    ) -> None:
        if unpaired not in UNPAIRED:
            raise InvalidOptionError(f"unpaired must be one of {UNPAIRED}, got {unpaired!r}.", field="unpaired")
        if isinstance(sensors, str) or not sensors:
            raise InvalidOptionError(
                f"sensors must be a non-empty list of folder names such as ['SPOT', 'Sentinel'], got {sensors!r}.",
                field="sensors",
            )
        sensor_names = dict(sensor_names or {})
        stray = sorted(set(sensor_names) - set(sensors))
        if stray:
            raise InvalidOptionError(
                f"sensor_names renames folders {stray} that are not in sensors {list(sensors)}.", field="sensor_names"
            )
        self.root = Path(root)
        self.sensors = tuple(sensors)
        self.names = {folder: sensor_names.get(folder, folder) for folder in self.sensors}
        if len(set(self.names.values())) != len(self.names):
            raise InvalidOptionError(f"Two sensor folders map to the same name: {self.names}.", field="sensor_names")
        self.transform, self.mode = transform, mode

        if not self.root.is_dir():
            raise FileNotFoundError(f"MSC-France root {self.root} does not exist; expected the layout {_LAYOUT}.")
        present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        for folder in self.sensors:
            if folder not in present:
                raise FileNotFoundError(
                    f"Sensor folder {folder!r} is not in {self.root} (it has {present}); expected the layout {_LAYOUT}."
                )
        tiles = {
            folder: {
                city.name: {p.stem for p in city.glob("*.png")}
                for city in (self.root / folder).iterdir() if city.is_dir()
            }
            for folder in self.sensors
        }
        known = sorted(set().union(*(t.keys() for t in tiles.values())))
        if cities is None:
            cities = known
        else:
            absent = [c for c in cities if c not in known]
            if absent:
                raise InvalidOptionError(
                    f"Cities {absent} are in no sensor folder under {self.root}; cities there: {known}.", field="cities"
                )

        self.items: list[tuple[str, str]] = []
        self.skipped: list[tuple[str, str, tuple[str, ...]]] = []
        for city in sorted(cities):
            per_sensor = {folder: tiles[folder].get(city, set()) for folder in self.sensors}
            for tile in sorted(set().union(*per_sensor.values())):
                missing = tuple(f for f in self.sensors if tile not in per_sensor[f])
                if missing:
                    self.skipped.append((city, tile, missing))
                else:
                    self.items.append((city, tile))
        if self.skipped and unpaired == "error":
            city, tile, missing = self.skipped[0]
            has = [f for f in self.sensors if f not in missing]
            raise InvalidInputError(
                f"MSC-France tile {tile!r} of city {city!r} is in {has} but missing for sensor(s) {list(missing)} "
                f"(no {[str(self.root / f / city / f'{tile}.png') for f in missing]}); "
                f"{len(self.skipped)} tile(s) are not in every sensor. Pass {{unpaired}} to leave them out.",
                field="root",
                settings={"unpaired": "skip"},
            )
        if not self.items:
            raise InvalidInputError(
                f"No tile is present in every sensor folder {list(self.sensors)} under {self.root} "
                f"(cities {list(cities)}); expected the layout {_LAYOUT}.",
                field="root",
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        city, tile = self.items[index]
        images = {self.names[f]: self._load(self.root / f / city / f"{tile}.png") for f in self.sensors}
        return {
            "images": self.transform(images) if self.transform is not None else images,
            "city": city,
            "tile": tile,
        }

    def _load(self, path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            if self.mode is not None and image.mode != self.mode:
                image = image.convert(self.mode)
            array = np.asarray(image, dtype=np.float32)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
