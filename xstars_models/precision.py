"""Numeric precision of inference and training: one setting, ``"auto"``, ``"fp32"``, ``"bf16"`` or
``"int8"``, resolved per device into what actually runs.

- ``"fp32"``: full precision everywhere.
- ``"bf16"``: bfloat16 autocast (matrix products and attention in bf16, reductions and norms in
  fp32, as torch's autocast lists decide); for inference the trunk's Linear weights are cast to
  bf16 once (:func:`bf16_copy`) instead of by autocast on every call.
- ``"int8"``: inference only, CPU only. The trunk's ``nn.Linear`` layers (attention qkv and
  projection, MLP: nearly all of a ViT's arithmetic) run as int8 x int8 -> int32 products with
  per-output-channel weight scales and activations quantised dynamically, per batch; the patch
  embedding, norms, attention softmax and everything else stay fp32.
- ``"auto"`` (the default): bf16 on CUDA; on a CPU, bf16 only where the model's own forward (or
  training step) was *measured* at least :data:`BF16_MIN_SPEEDUP` times faster in bf16 than in
  fp32 (:mod:`xstars_models.calibration`: a few seconds, once per machine and workload, cached).
  Without a model to time (:func:`resolve_precision` called alone) the CPU's features give a
  first guess. The environment variable ``XSTARS_PRECISION`` (``fp32``/``bf16``/``int8``) forces
  what ``"auto"`` means, e.g. for reproducible runs; an explicit ``precision=`` argument wins over it.

Whatever runs inside, results are returned as float32.

Which CPUs count as bf16-native (the guess when nothing is measured)
--------------------------------------------------------------------
Only those where a bf16 matrix product beats fp32: x86 with AMX-BF16 (Sapphire Rapids and
later, when the OS / hypervisor exposes AMX) and Arm with the BF16 extension (BFMMLA). AVX512-BF16
alone does *not* count: its ``vdpbf16ps`` does 32 multiply-adds per instruction, the same as
two fp32 FMA units, so there is no compute gain. On this project's machine (2-core Xeon,
AVX512-BF16 and AVX512-FP16 without AMX, torch 2.14.1 / oneDNN 3.12) a bf16 GEMM of ViT-Tiny's
shapes ran at ~85 GFLOP/s against ~145 GFLOP/s in fp32 (one thread), and bf16 autocast made the
bundled model's forward 0.63x as fast and a training step 0.43x (BENCHMARKS.md, "Precision").

Why int8 uses torch's fbgemm kernels and not torchao
----------------------------------------------------
``torchao`` 0.18.0 installs with torch 2.14.1 and its ``quantize_(...,
Int8DynamicActivationInt8WeightConfig())`` runs (cosine 0.99998 to fp32), but in eager mode on
this CPU it is twice as *slow* as fp32 (a batch of 64 tiles of 64 px on the bundled model, one
thread, best of 10: 832 ms vs 416 ms): its CPU speed comes from ``torch.compile``, which would add
a compilation per input shape to every ``embed`` call. torch's own dynamic-quantised linear
kernels (fbgemm) ran the same batch in 254 ms (cosine 0.99994), so they are what ``"int8"`` uses,
called directly (``torch.ops.quantized.linear_prepack`` /
``linear_dynamic``) rather than through ``torch.ao.quantization.quantize_dynamic``, which torch
2.14 marks deprecated. Creating the int8 weight tensor (``torch.quantize_per_channel``) also
emits a deprecation notice of torch's quantised tensor type; it is silenced at that one call
because it concerns torch's internals, not anything the caller does. If a future torch drops
these kernels, ``"int8"`` raises an error naming the missing piece (there is no silent
fallback to another precision).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .errors import BackendUnavailableError, InvalidOptionError

__all__ = [
    "BF16_MIN_SPEEDUP",
    "PRECISION_ENV",
    "PRECISIONS",
    "TRAINING_PRECISIONS",
    "Int8Linear",
    "Precision",
    "bf16_copy",
    "cpu_bf16_native",
    "cpu_flags",
    "cpu_info",
    "decide",
    "forced_precision",
    "inference_copy",
    "int8_copy",
    "quantize_int8",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16", "int8")
TRAINING_PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "XSTARS_PRECISION"
# bf16 moves outputs a little (CLS cosine ~0.9999 to fp32), so it must pay clearly to be chosen.
BF16_MIN_SPEEDUP = 1.15


@dataclass(frozen=True)
class Precision:
    """What a requested precision resolved to on one device.

    Attributes:
        name: ``"fp32"``, ``"bf16"`` or ``"int8"``: what runs.
        requested: what was asked for (``"auto"`` or one of the above).
        device_type: ``"cpu"``, ``"cuda"``...
        reason: one sentence on why (for ``"auto"``: which hardware feature decided).
    """

    name: str
    requested: str
    device_type: str
    reason: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for this precision: bf16 autocast for ``"bf16"``, nothing
        otherwise (int8 layers are swapped in by :func:`quantize_int8`, not by a context)."""
        if self.name == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __str__(self) -> str:
        asked = "" if self.requested == self.name else f" (precision={self.requested!r})"
        return f"{self.name}{asked}: {self.reason}"


@functools.cache
def cpu_info() -> dict[str, str]:
    """The fields of ``/proc/cpuinfo``, each at its first occurrence (the first processor's), in
    the file's order; empty where there is no such file (macOS, Windows). Read once per process:
    ``"auto"`` asks on every ``embed`` call, and the CPU does not change under a running process."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags() -> set[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (``flags`` on x86,
    ``Features`` on Arm); empty where there is no such file (macOS, Windows)."""
    return next((set(value.split()) for key, value in cpu_info().items() if key in ("flags", "Features")), set())


def cpu_bf16_native(flags: set[str] | None = None, machine: str | None = None) -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 matrices faster than fp32, and why (see the module
    documentation for which features count).

    Args:
        flags: CPU feature flags; default: read from ``/proc/cpuinfo``.
        machine: ``platform.machine()`` value; default: this machine's.

    Returns:
        ``(native, reason)`` with a one-sentence reason naming the deciding feature.
    """
    flags = cpu_flags() if flags is None else flags
    machine = (platform.machine() if machine is None else machine).lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if "amx_bf16" in flags:
            return True, "the CPU has AMX-BF16 matrix units"
        if "avx512_bf16" in flags:
            return False, ("the CPU has AVX512-BF16 but no AMX-BF16 (none exposed to this OS): "
                           "bf16 matrix products are no faster than fp32 there")
        return False, "the CPU has no bf16 matrix instructions (no AMX-BF16)"
    if machine in ("aarch64", "arm64"):
        if "bf16" in flags:
            return True, "the Arm CPU has the BF16 extension (BFMMLA)"
        if not flags:
            return False, "the Arm CPU's features could not be read (no /proc/cpuinfo)"
        return False, "the Arm CPU has no BF16 extension"
    return False, f"bf16 support is not detected on {machine or 'this'} CPUs"


@functools.cache
def _this_cpu_bf16() -> tuple[bool, str]:
    return cpu_bf16_native()


def forced_precision(training: bool = False) -> str | None:
    """What ``XSTARS_PRECISION`` forces ``"auto"`` to (``None`` when unset or empty).

    Raises:
        InvalidOptionError: a value that is not a precision (``field="XSTARS_PRECISION"``).
    """
    value = os.environ.get(PRECISION_ENV, "").strip().lower()
    if not value:
        return None
    allowed = TRAINING_PRECISIONS if training else PRECISIONS
    if value not in allowed or value == "auto":
        raise InvalidOptionError(
            f"The environment variable {PRECISION_ENV}={value!r} is not a precision"
            f"{' for training' if training else ''}: use one of {allowed[1:]}, or unset it.",
            field=PRECISION_ENV,
        )
    return value


def decide(seconds: dict[str, float]) -> tuple[str, str]:
    """fp32 or bf16 from measured seconds per batch (``"fp32"``, ``"bf16"``, optionally
    ``"int8"``, reported only): bf16 when at least :data:`BF16_MIN_SPEEDUP` times faster.

    Returns:
        ``(name, summary)``, the summary like ``"bf16 1.80x fp32, int8 2.19x"``.
    """
    speedup = seconds["fp32"] / seconds["bf16"]
    summary = f"bf16 {speedup:.2f}x fp32"
    if isinstance(seconds.get("int8"), (int, float)) and seconds["int8"] > 0:
        summary += f", int8 {seconds['fp32'] / seconds['int8']:.2f}x (opt-in only)"
    return ("bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"), summary


def resolve_precision(
    precision: str,
    device: torch.device | str,
    training: bool = False,
    measure: Callable[[], tuple[str, str]] | None = None,
) -> Precision:
    """Resolve ``precision`` for ``device``.

    Args:
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"int8"``.
        device: where the computation runs.
        training: ``True`` for training, where ``"int8"`` is refused.
        measure: for ``"auto"`` on a CPU: ``() -> (name, reason)`` that times the model
            (:meth:`XStarsBase.resolve_precision` passes one); without it the CPU's features decide.

    Raises:
        InvalidOptionError: an unknown precision, ``"int8"`` for training or on a non-CPU device
            (``field="precision"``); a bad ``XSTARS_PRECISION`` (``field="XSTARS_PRECISION"``).
    """
    device_type = torch.device(device).type
    if precision not in PRECISIONS:
        raise InvalidOptionError(f"precision must be one of {PRECISIONS}, got {precision!r}.", field="precision")
    forced = forced_precision(training) if precision == "auto" else None
    if forced is not None:
        resolved = resolve_precision(forced, device, training)
        return Precision(resolved.name, precision, device_type, f"forced by {PRECISION_ENV}={forced}")
    if precision == "int8":
        if training:
            raise InvalidOptionError(
                "{precision} is for inference only (int8 layers have no gradients); "
                "train with precision 'auto', 'bf16' or 'fp32'.",
                field="precision",
                settings={"precision": precision},
            )
        if device_type != "cpu":
            raise InvalidOptionError(
                f"{{precision}} runs on CPU only (torch's fbgemm/qnnpack kernels), not on {device_type!r}; "
                "use precision 'bf16' (or 'auto') there.",
                field="precision",
                settings={"precision": precision},
            )
        return Precision("int8", precision, device_type, "int8 Linear layers, fp32 elsewhere")
    if precision == "fp32":
        return Precision("fp32", precision, device_type, "full precision, as requested")
    if precision == "bf16":
        return Precision("bf16", precision, device_type, "bf16 autocast, as requested")
    if device_type == "cuda":
        return Precision("bf16", precision, device_type, "CUDA runs bf16 matrix products on tensor cores")
    if device_type == "cpu":
        if measure is not None:
            name, reason = measure()
            return Precision(name, precision, device_type, reason)
        native, reason = _this_cpu_bf16()
        return Precision("bf16" if native else "fp32", precision, device_type, f"not measured: {reason}")
    return Precision("fp32", precision, device_type, f"no bf16 default for {device_type!r} devices")


class Int8Linear(nn.Module):
    """An ``nn.Linear`` for inference with int8 weights (symmetric, one scale per output
    channel) and activations quantised per call (asymmetric uint8 over the whole input, 7-bit
    range: fbgemm's AVX2/AVX512 kernels add pairs of u8 x s8 products in int16, which full 8-bit
    values could saturate). Input and output are float32.

    Args:
        linear: the layer to quantise (its weights are copied, not shared).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        engines = torch.backends.quantized.supported_engines
        if not hasattr(torch.ops.quantized, "linear_dynamic") or all(e == "none" for e in engines):
            raise BackendUnavailableError(
                f"{{precision}} needs torch's quantised linear kernels, which this torch "
                f"({torch.__version__}, engines {engines}) does not have; use precision 'fp32' or 'bf16'.",
                field="precision",
                settings={"precision": "int8"},
            )
        weight = linear.weight.detach().float().cpu()
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():
            # torch announces the retirement of its quantised tensor type here; see the module
            # documentation for why these kernels are still the ones to use.
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor, torch.quantize_per_channel.*")
            qweight = torch.quantize_per_channel(
                weight, scales, torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8
            )
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


# Each model's inference copies, by kind, with the weight versions they were made from.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_Module = TypeVar("_Module", bound=nn.Module)


def _cached_copy(model: _Module, kind: str, make: Callable[[_Module], _Module]) -> _Module:
    """``make(model)``, made once per ``kind`` and reused until any weight of ``model`` changes
    (in place, by loading or by moving)."""
    key = tuple((t.data_ptr(), t._version) for t in [*model.parameters(), *model.buffers()])
    copies = _COPIES.setdefault(model, {})
    cached = copies.get(kind)
    if cached is None or cached[0] != key:
        cached = copies[kind] = (key, make(model))
    return cached[1]


def int8_copy(model: _Module, part: str = "trunk") -> _Module:
    """An inference copy of ``model`` whose submodule ``part`` has int8 Linear layers (CPU), made
    once and reused until any weight of ``model`` changes (in place, by loading or by moving)."""

    def make(source: _Module) -> _Module:
        quantized = copy.deepcopy(source).cpu().eval()
        quantize_int8(quantized.get_submodule(part), inplace=True)
        return quantized

    return _cached_copy(model, f"int8:{part}", make)


def bf16_copy(model: _Module, part: str = "trunk") -> _Module:
    """An inference copy of ``model`` whose submodule ``part`` keeps its ``nn.Linear`` weights
    and biases in bfloat16, for running under bf16 autocast; made once and reused until any
    weight of ``model`` changes.

    Why a copy and autocast together: autocast alone casts every fp32 weight to bf16 on every
    call (a full read and write of the weights per batch); with the weights already bf16 that cast
    is a no-op. Autocast still decides the rest: LayerNorm runs in fp32 and the attention softmax
    inside ``scaled_dot_product_attention`` accumulates in fp32, and the residual stream stays
    fp32, which keeps the CLS cosine to fp32 at ~0.99999 (an all-bf16 model, LayerNorm
    excepted, measured 0.99996 at the same speed). Only the Linear layers are cast: they hold
    nearly all of a ViT's weights and arithmetic.
    """

    def make(source: _Module) -> _Module:
        cast = copy.deepcopy(source).eval()
        for _, linear in _linears(cast.get_submodule(part)):
            linear.to(torch.bfloat16)
        return cast

    return _cached_copy(model, f"bf16:{part}", make)


def inference_copy(model: _Module, precision: str, part: str = "trunk") -> _Module:
    """What runs inference at ``precision`` (a resolved name: ``"fp32"``, ``"bf16"`` or
    ``"int8"``): ``model`` itself, :func:`bf16_copy` or :func:`int8_copy`. Run it inside
    :meth:`Precision.autocast`."""
    if precision == "int8":
        return int8_copy(model, part)
    if precision == "bf16":
        return bf16_copy(model, part)
    return model


def quantize_int8(module: nn.Module, inplace: bool = False) -> nn.Module:
    """``module`` with its ``nn.Linear`` layers replaced by :class:`Int8Linear`, on CPU and in
    eval mode: a copy (``module`` left unchanged) unless ``inplace``.

    Raises:
        BackendUnavailableError: this torch lacks the quantised linear kernels.
    """
    quantized = (module if inplace else copy.deepcopy(module)).cpu().eval()
    for name, child in list(_linears(quantized)):
        parent_name, _, attribute = name.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        setattr(parent, attribute, Int8Linear(child))
    return quantized


def _linears(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, child in module.named_modules():
        if type(child) is nn.Linear:
            yield name, child
