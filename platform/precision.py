"""Which precisions a device's frozen backbone can run in, by any of their spellings.

The device never trains its backbone, so its weights can live in low precision: on a phone they
are most of the memory a device spends.

Precisions (``WEIGHT_PRECISIONS``)
    ``fp32``  the checkpoint as is.
    ``bf16``  every weight and every activation in bfloat16 (fast where the CPU has native bf16:
              AVX512-BF16 / AMX on x86, BF16 on Arm; it runs anywhere, slowly elsewhere).
    ``int8``  weight-only int8 for every ``nn.Linear`` (and GPT-2 ``Conv1D``) of the transformer
              blocks: symmetric, one fp32 scale per output channel. Activations stay fp32.
    ``int4``  weight-only 4-bit for the same layers: asymmetric, one fp16 scale and one fp16
              minimum per group of ``group_size`` (default 32) input values along each row, two
              values packed per byte (llama.cpp's Q4_1 grid: the bundled SmolLM2, itself converted
              from a Q4_1 GGUF, round-trips almost exactly; expect more error on a bf16 checkpoint).

    In both integer modes the token embedding table is stored in int8 (one scale per row; the
    residual stream starts there, so it does not go down to 4 bits), and a tied LM head is an
    int8 view of the same rows (stored once). Norms, position embeddings and an untied LM head
    keep the checkpoint's precision. The layers are :mod:`mobiflower.platform.quantized_layers`;
    a model is converted by :mod:`mobiflower.platform.weight_conversion` and kept ready to map by
    :mod:`mobiflower.platform.prepared_weights`.

The precision is part of the backbone fingerprint frames carry (``llama-d576-L30-int8-<digest>``),
and the digest is computed on the quantized weights, so a side network trained on one precision
is never fed activations of another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mobiflower.platform.hf_model import BackboneError

WEIGHT_PRECISIONS = ("fp32", "bf16", "int8", "int4")
"""Backbone weight precisions a device can run; :func:`precision_support` says which run well here."""

PRECISION_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8", "int4": "int4"}
"""The precision's name in the backbone fingerprint (fp32/bf16 keep torch's dtype names)."""

DEFAULT_INT4_GROUP_SIZE = 32
"""Input values per int4 scale and minimum (llama.cpp's Q4_1 group)."""

_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "f32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "int8": "int8",
    "w8": "int8",
    "8bit": "int8",
    "8-bit": "int8",
    "int4": "int4",
    "w4": "int4",
    "4bit": "int4",
    "4-bit": "int4",
}
_NOT_ON_CPU = {
    "fp16": "float16 GEMM on CPU is slow and loses range; use bf16 (native on AVX512-BF16/AMX CPUs) or int8",
    "float16": "float16 GEMM on CPU is slow and loses range; use bf16 (native on AVX512-BF16/AMX CPUs) or int8",
    "int2": "no maintained CPU path runs 2-bit weights; 4-bit (int4) is the lowest here",
    "nf4": "NF4 needs bitsandbytes or torchao's NF4Tensor, both GPU-oriented; use int4",
    "fp8": "float8 weights need a GPU (torchao Float8WeightOnlyConfig); use int8",
}


class WeightPrecisionError(BackboneError):
    """The requested weight precision is unknown or cannot run here; the message says what to use."""


def normalize_precision(precision: str) -> str:
    """``fp32``/``bf16``/``int8``/``int4`` for any accepted spelling, or a :class:`WeightPrecisionError`."""
    key = str(precision).strip().lower().removeprefix("torch.")
    if key in _ALIASES:
        return _ALIASES[key]
    reason = _NOT_ON_CPU.get(key)
    raise WeightPrecisionError(
        f"weight precision {precision!r} is not supported{': ' + reason if reason else ''}. "
        f"Choose one of {', '.join(WEIGHT_PRECISIONS)}."
    )


def precision_of_dtype(dtype: torch.dtype) -> str:
    """``fp32``/``bf16`` for those dtypes; torch's name otherwise (e.g. ``float16``)."""
    name = str(dtype).removeprefix("torch.")
    return _ALIASES.get(name, name)


def bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm)."""
    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_arm_sve_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - a probe missing in this build answers "no"
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
        return "bf16" in flags or "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def precision_support() -> dict[str, dict[str, Any]]:
    """For each precision: does it run here (``supported``), and is it fast here (``native``)."""
    native_bf16 = bf16_native()
    return {
        "fp32": {"supported": True, "native": True, "path": "ATen fp32 GEMM"},
        "bf16": {
            "supported": True,
            "native": native_bf16,
            "path": "ATen bf16 GEMM (oneDNN)"
            + ("" if native_bf16 else "; this CPU has no native bf16: it runs, slowly"),
        },
        "int8": {
            "supported": True,
            "native": True,
            "path": "weight-only int8 (per-channel scales), dequantized per layer + ATen fp32 GEMM",
        },
        "int4": {
            "supported": True,
            "native": True,
            "path": "weight-only 4-bit (per-group scale and minimum), dequantized per layer + ATen fp32 GEMM",
        },
    }


def precision_from_fingerprint(fingerprint: str) -> str | None:
    """The weight precision a backbone fingerprint names (``llama-d576-L30-int8-ab12...`` -> ``int8``)."""
    parts = str(fingerprint).split("-")
    if len(parts) < 2:
        return None
    return _ALIASES.get(parts[-2])


__all__ = [
    "WEIGHT_PRECISIONS",
    "PRECISION_DTYPE_NAMES",
    "DEFAULT_INT4_GROUP_SIZE",
    "WeightPrecisionError",
    "normalize_precision",
    "precision_of_dtype",
    "bf16_native",
    "precision_support",
    "precision_from_fingerprint",
]
