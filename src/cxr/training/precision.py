"""How training steps compute: float32, or bf16 autocast with channels_last. CUDA always takes the latter. A CPU
takes it (`train.cpu_bf16: auto`) only where it has native bf16 instructions and only for archs that
`bench/train_speed.py` measured faster that way: bf16 emulated in float32 is slower, and some archs gain nothing.
Evaluation, calibration, thresholds and promotion are float32 whatever trained the model."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal, NamedTuple

import torch

CpuBf16 = Literal["auto", "on", "off"]

class Mode(NamedTuple):
    bf16: bool = False  # autocast to bfloat16 in training steps (no loss scaling needed)
    channels_last: bool = False  # NHWC memory layout of the model and its batches

    @property
    def name(self) -> str:
        return "bf16+channels_last" if self.bf16 and self.channels_last else \
            "bf16" if self.bf16 else "float32+channels_last" if self.channels_last else "float32"


FLOAT32, FAST = Mode(), Mode(bf16=True, channels_last=True)

# Per arch, the fastest mode on a CPU with native bf16 (AMX or AVX512-BF16), measured at 64 and 128 px, batch
# 64, by `python bench/train_speed.py` (docs/benchmarks.md). An arch left out trains in float32 under `auto`.
CPU_MODES: dict[str, Mode] = {"xrnet": FAST, "tinyvgg": FAST}


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware: x86's AMX-BF16 or AVX512-BF16, Arm's BF16 (as
    torch's cpuinfo reads them from CPUID or the Arm feature registers)."""
    caps = torch.cpu.get_capabilities()
    return any(caps.get(flag) for flag in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))


def training_mode(device: torch.device, arch: str, setting: CpuBf16 = "auto") -> Mode:
    """What the training steps of `arch` use on `device`: `on` forces bf16 on any CPU (emulated where it has
    no native bf16: slow), `off` keeps float32."""
    if device.type == "cuda" or setting == "on":
        return FAST
    return CPU_MODES.get(arch, FLOAT32) if setting == "auto" and native_bf16() else FLOAT32


def autocast(device: torch.device, mode: Mode) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.bf16)
