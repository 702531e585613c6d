"""``XStarsBase``: an :class:`~.encoder.XStarsEncoder` plus the Hugging Face style
``from_pretrained`` / ``save_pretrained`` and ``embed``. Users get :class:`xstars_models.XStars`,
which adds the methods whose work lives in the layers that use a model (``adapt``,
``embed_scene``, ``push_to_hub``, adapters); those layers take and return this class."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
from tqdm.auto import tqdm

from .calibration import calibrate, calibration_key, model_runs
from .config import CONFIG_NAME, WEIGHTS_NAME, WHITENING_NAME, StemConfig, XStarsConfig, arch_kwargs_problem, stem_file_name
from .devices import check_device
from .encoder import XStarsEncoder, pool_tokens, take_indices
from .errors import ConfigError, InvalidOptionError, UnknownOptionError
from .hub import HubOptions, resolve_model
from .inputs import ImageInput, check_token_count, to_batch, trim_to_patches
from .lora import lora_config, merge_lora
from .precision import Precision, inference_copy, int8_copy, resolve_precision
from .sensors import SensorSpec, get_sensor
from .serialization import atomic_write_bytes, load_state_dict_strict, read_verified_safetensors, write_safetensors
from .stac_item import write_stac_item
from .whitening import GlobalWhitening

__all__ = ["OUTPUTS", "ModelT", "XStarsBase"]

OUTPUTS = ("cls", "mean", "patch", "map")

# Default limit of tokens per image in embed(): a 128 x 128 token grid (1024 px at patch 8, 2048 px
# at patch 16) is far beyond the pretraining grids and still takes seconds; an 8000 x 8000 px
# scene at patch 8 (a million tokens) ran to 5 GB.
MAX_TOKENS = 16384

logger = logging.getLogger(__name__)

# The class a constructor was called on (XStars.from_pretrained() gives an XStars), and the class
# the layers above return when given a model of it (adapt() of an XStars is an XStars).
ModelT = TypeVar("ModelT", bound="XStarsBase")


class XStarsBase(XStarsEncoder):
    """A cross-sensor X-STARS encoder: one ViT trunk, one input stem per sensor, with loading,
    saving and ``embed``; :class:`xstars_models.XStars` adds the workflows.

    Create one with :meth:`from_pretrained` (registry id, Hub repo or folder) or :meth:`new`
    (random weights, for training). ``lineage``, ``training`` and ``metrics`` are free-form
    records saved in ``config.json`` and shown in model cards. ``whitening`` (a
    :class:`~.whitening.GlobalWhitening` or ``None``) is what ``embed(..., whiten=True)`` applies;
    it holds for the weights it was fit on, so training drops it.
    """

    def __init__(self, config: XStarsConfig) -> None:
        super().__init__(config.arch, config.arch_kwargs, config.sensors)
        self.lineage: dict[str, Any] = dict(config.lineage)
        self.training_record: dict[str, Any] = dict(config.training)
        self.metrics: dict[str, Any] = dict(config.metrics)
        self.whitening: GlobalWhitening | None = None
        self.name_or_path: str | None = None
        self.revision: str | None = None

    @classmethod
    def new(
        cls: type[ModelT],
        arch: str,
        sensors: Sequence[SensorSpec | str] | Mapping[str, SensorSpec | str],
        patch_sizes: Mapping[str, int] | None = None,
        **arch_kwargs: Any,
    ) -> ModelT:
        """A randomly initialised model.

        Args:
            arch: timm ViT name, e.g. ``vit_small_patch16_224``.
            sensors: specs or built-in sensor names (primary first), or a mapping from the names
                the model should use to specs.
            patch_sizes: pixels per token for non-primary sensors; default from the GSD ratio
                (each token covers the same ground as a primary-sensor token).
            arch_kwargs: ``timm.create_model`` overrides (``patch_size``, ``img_size``, ``depth``,
                ``embed_dim``, ``num_heads``...).

        Raises:
            InvalidOptionError: no ``sensors``, an unknown sensor name, an ``arch`` that is not a
                timm ViT or whose patch size cannot be read, a ``patch_sizes`` entry that does not fit.
            UnknownOptionError: an ``arch_kwargs`` keyword timm's ViT does not take, or one the
                model sets itself (``field``: that keyword).
        """
        problem = arch_kwargs_problem(arch_kwargs)
        if problem is not None:
            raise UnknownOptionError(f"{problem[1]}.", field=problem[0])
        if isinstance(sensors, Mapping):
            named = {name: get_sensor(s) if isinstance(s, str) else s for name, s in sensors.items()}
        else:
            specs = [get_sensor(s) if isinstance(s, str) else s for s in sensors]
            named = {spec.name: spec for spec in specs}
        if not named:
            raise InvalidOptionError("A model needs at least one sensor.", field="sensors")
        primary_name, primary = next(iter(named.items()))
        trunk_patch = arch_kwargs.get("patch_size") or _arch_patch_size(arch)
        model = cls(XStarsConfig(arch, dict(arch_kwargs), {primary_name: StemConfig(primary, trunk_patch)}))
        for name, spec in list(named.items())[1:]:
            model.add_sensor(spec, patch_size=(patch_sizes or {}).get(name), name=name)
        return model

    @property
    def config(self) -> XStarsConfig:
        """The model's current configuration (``files`` is filled by :meth:`save_pretrained`)."""
        return XStarsConfig(
            arch=self.arch,
            arch_kwargs=dict(self.arch_kwargs),
            sensors=dict(self.sensors),
            lineage=dict(self.lineage),
            training=dict(self.training_record),
            metrics=dict(self.metrics),
            whitening=self.whitening.metadata() if self.whitening is not None else {},
        )

    def weight_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """State dicts by file: the timm trunk in ``model.safetensors``, one file per extra stem.
        LoRA updates (from ``adapt(mode="lora")``) are merged into a copy of the trunk first, so
        the file always has exactly timm's keys. A fitted whitening goes in its own file."""
        trunk = self.trunk
        if lora_config(trunk) is not None:
            trunk = copy.deepcopy(trunk)
            merge_lora(trunk)
        tensors = {WEIGHTS_NAME: trunk.state_dict()}
        for name in list(self.sensors)[1:]:
            tensors[stem_file_name(name)] = self.stems[name].state_dict()
        if self.whitening is not None:
            tensors[WHITENING_NAME] = self.whitening.tensors()
        return tensors

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``config.json``, the safetensors weight files and their STAC item (``stac-item.json``,
        :mod:`.stac_item`; no licence, which ``push_to_hub`` adds) into ``save_directory``.

        Each file is written to a temporary name and renamed; ``config.json``, which records the
        sha256 of every weight file, is written last, so an interrupted save never leaves a
        config that points at weights it does not describe.
        """
        folder = Path(save_directory)
        config = self.config
        for file_name, tensors in self.weight_tensors().items():
            config.files[file_name] = write_safetensors(folder / file_name, tensors)
        write_stac_item(folder, config)
        atomic_write_bytes(folder / CONFIG_NAME, config.to_json().encode("utf-8"))
        return folder

    @classmethod
    def from_pretrained(
        cls: type[ModelT],
        name_or_path: str | Path,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
        force_download: bool = False,
    ) -> ModelT:
        """Load a model by registry id (``xstars-s2-aerial``), Hub repo id (``org/name`` or
        ``org/name@revision``) or local folder.

        Every weight file is checked against the sha256 recorded in the manifest (registry ids)
        or in ``config.json`` before any tensor is loaded, and loading is strict. A registry model
        pinned to a commit that is already cached loads without any network request; with
        ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` nothing is ever requested.

        Raises:
            ModelNotFoundError: unknown id (with close matches) or missing Hub repo.
            InvalidOptionError: a ``revision`` that contradicts the name's (``org/name@rev``) or
                the commit a registry id is pinned to.
            ConfigError: a ``config.json`` that is malformed or names a trunk timm cannot build.
            OfflineFilesMissingError: files not cached while downloads are off.
            ChecksumError: a file's bytes differ from the recorded sha256 or size.
            StateDictMismatchError: weights that do not fit the architecture.
            InvalidOptionError: a ``map_location`` this machine cannot compute on
                (:func:`~.devices.check_device`), refused before anything is downloaded.
        """
        where = check_device(map_location, field="map_location")
        options = HubOptions(
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
            force_download=force_download,
        )
        resolved = resolve_model(name_or_path, options)
        tensors = {
            name: read_verified_safetensors(path, resolved.records[name], "cpu", name, resolved.repair)
            for name, path in resolved.paths.items()
        }
        try:
            # Built on the CPU with random weights that the file's replace: drawing them must not
            # move the caller's random stream (a seeded script would depend on what it loaded).
            with torch.random.fork_rng(devices=[]):
                model = cls(resolved.config)
        except ConfigError as err:  # the trunk timm built does not match the config: name the model
            raise ConfigError(f"{name_or_path} ({CONFIG_NAME}): {err}", field=err.field) from None
        load_state_dict_strict(model.trunk, tensors[WEIGHTS_NAME], f"{name_or_path} ({WEIGHTS_NAME})")
        for sensor in list(model.sensors)[1:]:
            file_name = stem_file_name(sensor)
            load_state_dict_strict(model.stems[sensor], tensors[file_name], f"{name_or_path} ({file_name})")
        if WHITENING_NAME in tensors:
            model.whitening = GlobalWhitening.from_tensors(
                tensors[WHITENING_NAME], resolved.config.whitening, model.embed_dim, f"{name_or_path} ({WHITENING_NAME})"
            )
        model.name_or_path = str(name_or_path)
        model.revision = resolved.revision
        return model.to(where).eval()

    # The return type follows ``layers``: one tensor without it, a list of them (one per block) with it.
    @overload
    def embed(
        self, images: ImageInput, sensor: str, output: str = ..., layers: None = None, batch_size: int = ...,
        device: str | torch.device | None = ..., progress: bool = ..., bands: Sequence[str] | None = ...,
        layout: str | None = ..., precision: str = ..., max_tokens: int | None = ..., whiten: bool = ...,
    ) -> torch.Tensor: ...

    @overload
    def embed(
        self, images: ImageInput, sensor: str, output: str, layers: int | Sequence[int], batch_size: int = ...,
        device: str | torch.device | None = ..., progress: bool = ..., bands: Sequence[str] | None = ...,
        layout: str | None = ..., precision: str = ..., max_tokens: int | None = ..., whiten: bool = ...,
    ) -> list[torch.Tensor]: ...

    @overload
    def embed(
        self, images: ImageInput, sensor: str, output: str = ..., *, layers: int | Sequence[int], batch_size: int = ...,
        device: str | torch.device | None = ..., progress: bool = ..., bands: Sequence[str] | None = ...,
        layout: str | None = ..., precision: str = ..., max_tokens: int | None = ..., whiten: bool = ...,
    ) -> list[torch.Tensor]: ...

    @torch.inference_mode()
    def embed(
        self,
        images: ImageInput,
        sensor: str,
        output: str = "cls",
        layers: int | Sequence[int] | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = True,
        bands: Sequence[str] | None = None,
        layout: str | None = None,
        precision: str = "auto",
        max_tokens: int | None = MAX_TOKENS,
        whiten: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Embed imagery of one sensor.

        Args:
            images: one image or a batch: NumPy arrays, torch tensors or PIL images, H x W x C or
                C x H x W, holding the sensor's digital numbers (e.g. uint8 for 8-bit RGB, uint16
                reflectance x 1e4 for ``sentinel2``) or floats in the same units. Any size of at
                least one patch; pixels beyond a whole number of patches (bottom and right) are
                dropped with a warning.
            sensor: which of the model's sensors the imagery comes from (``model.sensors``).
            output: ``"cls"`` (B x D), ``"mean"`` of patch tokens (B x D), ``"patch"`` tokens
                (B x N x D) or ``"map"`` (B x D x h x w, token (i, j) covering pixels
                [i*p, (i+1)*p) x [j*p, (j+1)*p) for patch size p).
            layers: ``None`` for the final (LayerNorm-ed) output, or block indexes / a count of
                last blocks as in timm's ``forward_intermediates``; then a list with one tensor per
                block (raw block outputs, no final norm) is returned.
            batch_size: images per forward pass.
            device: where to compute (the model is moved there): ``"cpu"``, ``"cuda[:N]"``,
                ``"mps"`` (checked first: :func:`~.devices.check_device`); default: where the model is.
            progress: show a progress bar when there is more than one batch.
            bands: band names of the input channels when they are not in the sensor's order.
            layout: ``"HWC"`` or ``"CHW"`` when the band count cannot tell (e.g. 3 x W x 3).
            precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"int8"``: see
                :mod:`xstars_models.precision`; what ran is logged at INFO level.
            max_tokens: the most tokens (patches) one image may have; a larger one is refused
                with a pointer to :meth:`embed_scene`, which embeds a scene tile by tile in bounded
                memory. ``None`` embeds any size in one pass (memory and time grow with the
                square of the token count).
            whiten: return the ``cls`` or ``mean`` output whitened by the model's fitted
                :attr:`whitening` (each sensor's training mean removed, shared PCA whitening):
                the global embedding to compare footprints across sensors by cosine similarity.

        Returns:
            float32 CPU tensor(s) in the ``output`` layout, whatever the precision.

        Raises:
            InvalidOptionError: a bad ``output``, ``batch_size``, ``layers``, ``sensor``,
                ``bands``, ``layout``, ``precision``, ``whiten`` or ``device`` (a device this
                machine lacks included; ``field`` names it).
            InvalidInputError: ``images`` that do not fit the sensor (bands, dtype, units, NaN,
                size, ``max_tokens``); ``field="images"``.
        """
        if output not in OUTPUTS:
            raise InvalidOptionError(f"output must be one of {OUTPUTS}, got {output!r}.", field="output")
        if batch_size < 1:
            raise InvalidOptionError(f"batch_size must be >= 1, got {batch_size}.", field="batch_size")
        if layers is not None:
            take_indices(self.depth, layers, field="layers")
        move_to = None if device is None else check_device(device)
        stem = self.check_sensor(sensor)
        whitening = self.check_whiten(output, layers, sensor) if whiten else None
        batch = trim_to_patches(to_batch(images, stem.spec, stem.patch_size, bands, layout), stem.patch_size, sensor)
        check_token_count(batch, stem.patch_size, sensor, max_tokens)
        if move_to is not None:
            self.to(move_to)
        target = self.device
        tokens = (batch.shape[-2] // stem.patch_size) * (batch.shape[-1] // stem.patch_size)
        resolved = self.resolve_precision(precision, tokens=tokens, batch_size=batch_size)
        logger.info("embed %s: precision %s", sensor, resolved)
        was_training = self.training
        self.eval()
        try:
            encoder = inference_copy(self, resolved.name)
            chunks = [batch[i : i + batch_size] for i in range(0, len(batch), batch_size)]
            with resolved.autocast():
                results = [
                    encoder._embed_chunk(chunk.to(target, non_blocking=True), sensor, output, layers)
                    for chunk in tqdm(chunks, desc=f"embed {sensor}", unit="batch", disable=not progress or len(chunks) < 2)
                ]
        finally:
            self.train(was_training)
        if layers is None:
            out = torch.cat(results)
            return whitening.apply(out, output, sensor) if whitening is not None else out
        return [torch.cat(per_layer) for per_layer in zip(*results)]

    def check_whiten(self, output: str, layers: Any = None, sensor: str | None = None) -> GlobalWhitening:
        """The whitening that ``whiten=True`` applies to ``output`` (and ``layers``, ``sensor``),
        checked before any image is embedded.

        Raises:
            InvalidOptionError: the model has no whitening (``field="whiten"``), or it does not
                cover ``output``, ``layers`` or ``sensor`` (``field`` names which).
        """
        whitening = self.whitening
        if whitening is None:
            raise InvalidOptionError(
                "{whiten} needs a fitted whitening and this model has none (models made by training have none until "
                "one is fit): model.whitening = xstars_models.training.fit_global_whitening(model, training_pairs).",
                field="whiten",
                settings={"whiten": True},
            )
        if output not in whitening.pools or layers is not None:
            raise InvalidOptionError(
                f"{{whiten}} applies to the final {whitening.pools} outputs, not {{output}}"
                + ("" if layers is None else " with {layers}")
                + ".",
                field="output" if output not in whitening.pools else "layers",
                settings={"whiten": True, "output": output, "layers": layers},
            )
        if sensor is not None:
            whitening.check(output, sensor)
        return whitening

    def int8_copy(self) -> XStarsBase:
        """This model with int8 trunk Linear layers (CPU), for inference: see
        :func:`xstars_models.precision.int8_copy`."""
        return int8_copy(self)

    def resolve_precision(
        self,
        precision: str = "auto",
        device: str | torch.device | None = None,
        *,
        tokens: int | None = None,
        batch_size: int = 8,
        training: bool = False,
    ) -> Precision:
        """What ``precision`` means for this model on ``device`` (default: where it is), with the
        reason: see :func:`xstars_models.precision.resolve_precision`. ``"auto"`` on a CPU times
        this model (:mod:`xstars_models.calibration`; cached per machine and workload).

        Args:
            tokens: patch tokens per image of the work to come (default: the trunk's pretraining
                grid); part of the calibration's key.
            batch_size: images per timed batch (at most 8 are timed, to keep it to seconds).
            training: time a training step (forward and backward) instead of a forward.
        """
        where = self.device if device is None else check_device(device)
        tokens = tokens or int(self.trunk.patch_embed.grid_size[0] * self.trunk.patch_embed.grid_size[1])

        def runs() -> dict[str, Callable[[], object]]:
            return model_runs(self, where, tokens, min(batch_size, 8), training)

        def measure() -> tuple[str, str]:
            return calibrate(calibration_key(where, self.arch, self.embed_dim, tokens, training), runs)

        # Only a model where it is can be timed; elsewhere the CPU's features give the guess.
        return resolve_precision(precision, where, training, measure if where == self.device else None)

    def _embed_chunk(self, x: torch.Tensor, sensor: str, output: str, layers: int | Sequence[int] | None) -> Any:
        final, intermediates, grid = self.forward_tokens(x, sensor, [] if layers is None else layers)
        prefix = self.trunk.num_prefix_tokens
        if layers is None:
            return pool_tokens(final, output, grid, prefix)
        return [pool_tokens(tokens, output, grid, prefix) for tokens in intermediates]


def _arch_patch_size(arch: str) -> int:
    match = re.search(r"patch(\d+)", arch)
    if match is None:
        raise InvalidOptionError(f"Cannot read the patch size from architecture {arch!r}; pass patch_size=.", field="arch")
    return int(match[1])
