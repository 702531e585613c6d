"""Whitening of global embeddings (the CLS token, the mean patch token) for retrieval across sensors.

Self-distillation and InfoNCE leave each sensor's global embeddings offset from the other's and
their variance concentrated in a few directions; cosine similarity between two footprints is then
decided by those few directions, which separate kinds of landscape better than neighbouring
places. The usual post-processing of image retrieval (PCA whitening, Jegou & Chum, ECCV 2012)
fixes both: subtract the sensor's own mean, rotate onto the principal axes of training embeddings
and divide each axis by its standard deviation, shrunk towards the largest one so that near-empty
axes are not blown up into noise. The statistics come from training data only
(:func:`fit_whitening`; :func:`xstars_models.training.fit_global_whitening` embeds a data set
for it); ``XStars.embed(..., whiten=True)`` returns the whitened vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import InvalidInputError, InvalidOptionError, StateDictMismatchError

__all__ = ["DEFAULT_SHRINKAGE", "POOLS", "GlobalWhitening", "fit_whitening"]

POOLS = ("cls", "mean")
# Chosen on a split of the default model's training area (BENCHMARKS.md, session 6): 0.01 of the
# largest standard deviation is added to every axis's before dividing.
DEFAULT_SHRINKAGE = 0.01


class GlobalWhitening:
    """Per-sensor centres and one shared whitening matrix per pooled output.

    Args:
        centres: ``{pool: {sensor: D}}``, each sensor's mean training embedding.
        projections: ``{pool: D x D}``; whitened = (embedding - centre) @ projection.
        shrinkage: what the projection was fit with (see :func:`fit_whitening`).
        fit_on: a description of the training data it was fit on (for the model card).

    Raises:
        InvalidInputError: centres and projections that do not fit together (``field`` names which).
    """

    def __init__(
        self,
        centres: Mapping[str, Mapping[str, torch.Tensor]],
        projections: Mapping[str, torch.Tensor],
        shrinkage: float,
        fit_on: str = "",
    ) -> None:
        if not projections or set(projections) - set(POOLS) or set(centres) != set(projections):
            raise InvalidInputError(
                f"Whitening needs matching centres and projections for pools among {POOLS}, got centres for "
                f"{sorted(centres)} and projections for {sorted(projections)}.",
                field="projections",
            )
        sensors = [list(per_sensor) for per_sensor in centres.values()]
        if not sensors[0] or any(s != sensors[0] for s in sensors):
            raise InvalidInputError(f"Every pool's whitening must cover the same sensors, got {sensors}.", field="centres")
        for pool, projection in projections.items():
            dim = projection.shape[0]
            if projection.shape != (dim, dim) or any(c.shape != (dim,) for c in centres[pool].values()):
                shapes = {s: tuple(c.shape) for s, c in centres[pool].items()}
                raise InvalidInputError(
                    f"Pool {pool!r}: projection {tuple(projection.shape)} and centres {shapes} do not fit.", field="centres"
                )
        self.centres = {p: {s: c.detach().float().cpu() for s, c in per.items()} for p, per in centres.items()}
        self.projections = {p: m.detach().float().cpu() for p, m in projections.items()}
        self.shrinkage = float(shrinkage)
        self.fit_on = fit_on

    @property
    def pools(self) -> list[str]:
        return list(self.projections)

    @property
    def sensors(self) -> list[str]:
        return list(next(iter(self.centres.values())))

    def check(self, pool: str, sensor: str) -> None:
        """Raise :class:`~.errors.InvalidOptionError`, naming the fix, unless this whitening covers
        ``pool`` (``field="output"``, the embedding's name for it) and ``sensor`` (``"sensor"``)."""
        if pool not in self.projections:
            raise InvalidOptionError(f"This whitening was fit for outputs {self.pools}, not {pool!r}.", field="output")
        if sensor not in self.centres[pool]:
            raise InvalidOptionError(
                f"This model's whitening was fit on sensors {self.sensors}, not {sensor!r}; fit it again with that "
                "sensor's training images (xstars_models.training.fit_global_whitening) or embed without whitening ({whiten}).",
                field="sensor",
                settings={"whiten": False},
            )

    def apply(self, features: torch.Tensor, pool: str, sensor: str) -> torch.Tensor:
        """Whitened ``features`` (B x D embeddings of ``pool`` from ``sensor``), float32."""
        self.check(pool, sensor)
        centre = self.centres[pool][sensor]
        return ((features.double() - centre.double()) @ self.projections[pool].double()).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of ``whitening.safetensors``: ``{pool}.projection`` and ``{pool}.centre.{sensor}``."""
        out = {}
        for pool, projection in self.projections.items():
            out[f"{pool}.projection"] = projection.contiguous()
            out.update({f"{pool}.centre.{s}": c.contiguous() for s, c in self.centres[pool].items()})
        return out

    def metadata(self) -> dict[str, Any]:
        """What ``config.json`` records under ``whitening``."""
        return {"pools": self.pools, "sensors": self.sensors, "shrinkage": self.shrinkage, "fit_on": self.fit_on}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], dim: int, what: str
    ) -> GlobalWhitening:
        """Rebuild from ``whitening.safetensors`` and the ``config.json`` record, strictly: every
        tensor the record names, none more, each of the model's width ``dim``."""
        try:
            pools, sensors, shrinkage = list(metadata["pools"]), list(metadata["sensors"]), float(metadata["shrinkage"])
        except (KeyError, TypeError, ValueError) as err:
            raise StateDictMismatchError(f"{what}: config.json's 'whitening' record is incomplete ({err!r}).") from None
        expected: dict[str, tuple[int, ...]] = {f"{p}.projection": (dim, dim) for p in pools}
        expected.update({f"{p}.centre.{s}": (dim,) for p in pools for s in sensors})
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
        if missing or unexpected or wrong:
            raise StateDictMismatchError(
                f"{what}: whitening tensors do not match config.json (pools {pools}, sensors {sensors}, width {dim}): "
                f"missing {missing}, unexpected {unexpected}, wrong shape {wrong}."
            )
        return cls(
            {p: {s: tensors[f"{p}.centre.{s}"] for s in sensors} for p in pools},
            {p: tensors[f"{p}.projection"] for p in pools},
            shrinkage,
            str(metadata.get("fit_on", "")),
        )


def fit_whitening(
    features: Mapping[str, Mapping[str, torch.Tensor]], shrinkage: float = DEFAULT_SHRINKAGE, fit_on: str = ""
) -> GlobalWhitening:
    """Fit per-sensor centring and a shared PCA whitening on training embeddings.

    Args:
        features: ``{pool: {sensor: N x D}}`` embeddings of training images (``pool`` among
            :data:`POOLS`); every pool needs the same sensors, each with at least 2 images.
        shrinkage: added to every axis's standard deviation, as a fraction of the largest one,
            before dividing by it (> 0; small values whiten fully, large ones approach a rotation).
        fit_on: a description of the training data, kept in ``config.json``.

    Raises:
        InvalidOptionError: ``shrinkage`` not > 0.
        InvalidInputError: ``features`` that cannot be whitened (too few, NaN, mixed widths, all equal).
    """
    if not shrinkage > 0:
        raise InvalidOptionError(
            f"shrinkage must be > 0 (a fraction of the largest standard deviation), got {shrinkage}.", field="shrinkage"
        )
    centres, projections = {}, {}
    for pool, per_sensor in features.items():
        if not per_sensor:
            raise InvalidInputError(f"Pool {pool!r}: no sensors' features to fit the whitening on.", field="features")
        for sensor, x in per_sensor.items():
            if x.ndim != 2 or len(x) < 2 or not torch.isfinite(x).all():
                raise InvalidInputError(
                    f"Pool {pool!r}, sensor {sensor!r}: whitening needs an N x D tensor of finite features with "
                    f"N >= 2, got shape {tuple(x.shape)}{'' if torch.isfinite(x).all() else ' with NaN or inf'}.",
                    field="features",
                )
        dims = {s: x.shape[1] for s, x in per_sensor.items()}
        if len(set(dims.values())) > 1:
            raise InvalidInputError(f"Pool {pool!r}: sensors' features have different widths {dims}.", field="features")
        centres[pool] = {s: x.double().mean(0) for s, x in per_sensor.items()}
        centred = torch.cat([x.double() - centres[pool][s] for s, x in per_sensor.items()])
        variance, axes = torch.linalg.eigh(centred.T @ centred / len(centred))
        std = variance.clamp_min(0).sqrt()
        if not std.max() > 0:
            raise InvalidInputError(
                f"Pool {pool!r}: every training embedding is the same (a collapsed encoder?); nothing to whiten.",
                field="features",
            )
        projections[pool] = axes / (std + shrinkage * std.max())
    return GlobalWhitening(centres, projections, shrinkage, fit_on)
