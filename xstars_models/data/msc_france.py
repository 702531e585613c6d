"""The MSC-France layout of the X-STARS paper: ``root/{sensor}/{city}/{tile}.png``, the same tile
names across sensors, one footprint per name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["MSCFrancePairs"]


class MSCFrancePairs(Dataset):
    """Items ``{"images": {sensor: float32 C x H x W digital numbers}, "city", "tile"}``.

    Args:
        root: the ``MSC-France`` folder.
        sensor_names: folder name -> the model's sensor name, e.g.
            ``{"SPOT": "spot67_rgb", "Sentinel": "sentinel2_rgb"}``.
        cities: restrict to these city folders (default: every city of the first sensor).
        unpaired: ``"error"`` (default) or ``"skip"`` for tiles missing in some sensor.
    """

    def __init__(
        self,
        root: str | Path,
        sensor_names: dict[str, str],
        cities: list[str] | None = None,
        unpaired: str = "error",
    ) -> None:
        if unpaired not in ("error", "skip"):
            raise ValueError(f"unpaired must be 'error' or 'skip', got {unpaired!r}.")
        self.root, self.sensor_names = Path(root), dict(sensor_names)
        for folder in sensor_names:
            if not (self.root / folder).is_dir():
                raise FileNotFoundError(f"{self.root / folder} does not exist; expected root/{{sensor}}/{{city}}/{{tile}}.png.")
        first = next(iter(sensor_names))
        cities = cities or sorted(p.name for p in (self.root / first).iterdir() if p.is_dir())
        self.items: list[tuple[str, str]] = []
        for city in cities:
            tiles = {f: {p.stem for p in (self.root / f / city).glob("*.png")} for f in sensor_names}
            for tile in sorted(set().union(*tiles.values())):
                missing = [f for f in sensor_names if tile not in tiles[f]]
                if not missing:
                    self.items.append((city, tile))
                elif unpaired == "error":
                    raise ValueError(
                        f"MSC-France tile {tile!r} of city {city!r} is missing for sensor(s) {missing} "
                        f"(looked in {[str(self.root / f / city) for f in missing]}); pass unpaired='skip' to leave such tiles out."
                    )
        if not self.items:
            raise ValueError(f"No paired tiles found under {self.root} for sensors {list(sensor_names)}.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        city, tile = self.items[index]
        images = {}
        for folder, name in self.sensor_names.items():
            with Image.open(self.root / folder / city / f"{tile}.png") as image:
                array = np.asarray(image.convert("RGB"), dtype=np.float32)
            images[name] = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return {"images": images, "city": city, "tile": tile}
