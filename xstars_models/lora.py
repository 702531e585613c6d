"""Low-rank adaptation (LoRA, Hu et al. 2021) of the linear layers of a timm ViT trunk.

A wrapped layer computes ``W x + b + (alpha / rank) * B (A x)`` with ``W, b`` frozen. ``B`` starts
at zero, so applying LoRA leaves the model's outputs unchanged until it is trained.

While LoRA is applied the trunk's ``state_dict()`` keys differ from timm's (``...qkv.base.weight``
plus ``...qkv.lora_A`` / ``lora_B``); :func:`merge_lora` folds the updates into the base weights and
gives back exactly timm's keys, and :func:`base_state_dict` reads the untouched base weights under
timm's keys without merging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError, InvalidOptionError, InvalidTypeError, StateDictMismatchError
from .serialization import state_dict_mismatch

__all__ = [
    "DEFAULT_TARGETS",
    "LoRALinear",
    "apply_lora",
    "base_state_dict",
    "load_lora_state_dict",
    "lora_config",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
]

DEFAULT_TARGETS = ("attn.qkv", "attn.proj")
_LORA_TENSORS = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """An ``nn.Linear`` with a trainable low-rank update; the wrapped layer is frozen.

    Args:
        base: the layer to adapt (kept as the ``base`` submodule, weights shared, not copied).
        rank: rank of the update.
        alpha: the update is scaled by ``alpha / rank``, so that changing the rank does not change
            the size of the update for a given learning rate.
        dropout: dropout on the update's input (training only).

    Raises:
        InvalidTypeError: ``base`` is not an ``nn.Linear``.
        InvalidOptionError: a bad ``rank`` or ``dropout``.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise InvalidTypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}.", field="base")
        if not isinstance(rank, int) or rank < 1:
            raise InvalidOptionError(f"LoRA rank must be a positive integer, got {rank!r}.", field="rank")
        if not 0.0 <= dropout < 1.0:
            raise InvalidOptionError(f"LoRA dropout must be in [0, 1), got {dropout!r}.", field="dropout")
        # Remembered so that merge_lora() gives the layer back as it was found.
        self._base_requires_grad = base.weight.requires_grad
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        # The same initialisation as a fresh nn.Linear, so A x has the scale of a linear layer's
        # output; B = 0 makes the whole update zero at start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update as a full ``out x in`` matrix: ``(alpha / rank) * B @ A``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (modified in place)."""
        with torch.no_grad():
            self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        return self.base.requires_grad_(self._base_requires_grad)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _lora_layers(trunk: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in trunk.named_modules() if isinstance(module, LoRALinear)}


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def apply_lora(
    trunk: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap the ``targets`` linear layers of every block of a timm ``VisionTransformer`` in
    :class:`LoRALinear`, in place.

    Args:
        trunk: the ViT (``model.trunk``); its blocks are ``trunk.blocks``.
        rank, alpha, dropout: see :class:`LoRALinear`.
        targets: paths inside a block, e.g. ``"attn.qkv"``, ``"attn.proj"``, ``"mlp.fc1"``.

    Returns:
        The replaced layers' paths in the trunk (``blocks.0.attn.qkv``, ...).

    Raises:
        InvalidOptionError: no ``targets``, or a target that is not an ``nn.Linear`` in every block.
        InvalidInputError: LoRA already applied to ``trunk``.
        InvalidTypeError: ``targets`` given as one string, or a ``trunk`` without ``blocks``.
        Nothing is changed when any is raised.
    """
    if isinstance(targets, str):
        raise InvalidTypeError(f"targets must be a sequence of paths, got the string {targets!r}.", field="targets")
    if not targets:
        raise InvalidOptionError("apply_lora needs at least one target.", field="targets")
    blocks = getattr(trunk, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise InvalidTypeError(
            f"apply_lora expects a timm VisionTransformer with .blocks, got {type(trunk).__name__}.", field="trunk"
        )
    if _lora_layers(trunk):
        raise InvalidInputError("LoRA is already applied to this trunk; merge_lora() it first.", field="trunk")
    found: dict[str, nn.Linear] = {}
    problems = []
    for i, block in enumerate(blocks):
        for target in targets:
            path = f"blocks.{i}.{target}"
            try:
                layer = block.get_submodule(target)
            except AttributeError:
                problems.append(f"{path}: no such module")
                continue
            if not isinstance(layer, nn.Linear):
                problems.append(f"{path}: {type(layer).__name__}, not nn.Linear")
                continue
            found[path] = layer
    if problems:
        raise InvalidOptionError(
            f"Cannot apply LoRA to targets {list(targets)}: " + "; ".join(problems[:10]) + ".", field="targets"
        )
    # Validate everything before replacing anything, so an error leaves the trunk untouched.
    for path, layer in found.items():
        _replace(trunk, path, LoRALinear(layer, rank, alpha, dropout))
    return list(found)


def lora_config(trunk: nn.Module) -> dict[str, object] | None:
    """``{"rank", "alpha", "targets"}`` of the LoRA applied to ``trunk``, or ``None`` without LoRA.

    Raises:
        InvalidInputError: layers with different ranks or alphas, which one apply_lora() call cannot
            reproduce (``field="trunk"``).
    """
    layers = _lora_layers(trunk)
    if not layers:
        return None
    settings = {(layer.rank, layer.alpha) for layer in layers.values()}
    if len(settings) > 1:
        raise InvalidInputError(
            f"LoRA layers of this trunk use different (rank, alpha): {sorted(settings)}.", field="trunk"
        )
    (rank, alpha), = settings
    targets: list[str] = []
    for path in layers:
        # "blocks.3.attn.qkv" -> "attn.qkv"
        target = path.split(".", 2)[2] if path.startswith("blocks.") else path
        if target not in targets:
            targets.append(target)
    return {"rank": rank, "alpha": alpha, "targets": targets}


def lora_parameters(trunk: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (every layer's ``A`` and ``B``), e.g. for an optimizer."""
    return [getattr(layer, name) for layer in _lora_layers(trunk).values() for name in _LORA_TENSORS]


def lora_state_dict(trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed ``<layer path>.lora_A`` / ``.lora_B`` (``blocks.0.attn.qkv.lora_A``)."""
    return {
        f"{path}.{name}": getattr(layer, name).detach()
        for path, layer in _lora_layers(trunk).items()
        for name in _LORA_TENSORS
    }


def load_lora_state_dict(trunk: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy LoRA tensors (as from :func:`lora_state_dict`) into the trunk's LoRA layers, strictly.

    Raises:
        StateDictMismatchError: listing missing, unexpected and mis-shaped keys; nothing is copied.
    """
    expected = lora_state_dict(trunk)
    report = state_dict_mismatch(expected, tensors, "given")
    if report:
        lines = ["LoRA tensors do not match the trunk's LoRA layers:", *report]
        if not expected:
            lines.append("The trunk has no LoRA layers: call apply_lora() with the same rank and targets first.")
        raise StateDictMismatchError("\n".join(lines))
    layers = _lora_layers(trunk)
    with torch.no_grad():
        for key, value in tensors.items():
            path, _, name = key.rpartition(".")
            getattr(layers[path], name).copy_(value)


def merge_lora(trunk: nn.Module) -> list[str]:
    """Fold every LoRA update into its base weight and put the plain ``nn.Linear`` back, in place,
    so that ``trunk.state_dict()`` has exactly timm's keys again (and a plain timm model loads it).

    Returns:
        The merged layers' paths (empty when no LoRA was applied).
    """
    layers = _lora_layers(trunk)
    for path, layer in layers.items():
        _replace(trunk, path, layer.merged())
    return list(layers)


def base_state_dict(trunk: nn.Module) -> dict[str, torch.Tensor]:
    """The trunk's state dict without the LoRA updates: the frozen base weights under timm's keys,
    in timm's order. Equal to ``trunk.state_dict()`` when no LoRA is applied."""
    state = trunk.state_dict()
    paths = list(_lora_layers(trunk))
    for path in paths:
        for name in _LORA_TENSORS:
            del state[f"{path}.{name}"]
    # LoRALinear registers lora_A/B before its ``base`` child, so once they are dropped the base
    # tensors already sit where the plain layer's tensors would; renaming keeps that order.
    renamed: dict[str, torch.Tensor] = {}
    prefixes = tuple(f"{path}.base." for path in paths)
    for key, value in state.items():
        if key.startswith(prefixes):
            path, _, leaf = key.rpartition(".base.")
            key = f"{path}.{leaf}"
        renamed[key] = value
    return renamed
