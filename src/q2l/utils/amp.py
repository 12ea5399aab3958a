"""Mixed precision: which dtype a device computes fast, and the one autocast context q2l uses.

`trainer.precision=auto` (the default) picks bf16 where the hardware has bf16 matrix units: CUDA
devices that support bf16 natively (Ampere and later), CPUs with AVX512-BF16 or AMX. Elsewhere bf16
would be emulated and slower, so auto means fp32 there (and fp16 with loss scaling on CUDA devices
without bf16, whose tensor cores run fp16). docs/performance.md has the measured ratios.
"""

from __future__ import annotations

import contextlib

import torch

from q2l.utils.errors import ConfigError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision` itself, or for "auto" the fastest safe one on `device` (fp32, bf16 or fp16)."""
    if precision != "auto":
        if precision not in AUTOCAST_DTYPES:
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and cpu_has_bf16_units():
        return "bf16"
    return "fp32"


def cpu_has_bf16_units() -> bool:
    """True when this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The one mixed-precision context: autocast to bf16/fp16, or nothing for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
