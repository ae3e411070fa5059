"""How training steps compute: in float32 or bf16 autocast, in the contiguous or channels_last layout. CUDA always
takes bf16 + channels_last. A CPU (`train.cpu_bf16: auto`) takes bf16 only where it has native bf16 instructions,
and per arch the mode that `bench/train_speed.py` measured fastest: bf16 emulated in float32 is slower, and some
archs gain nothing. Evaluation, calibration, thresholds and promotion are float32 whatever trained the model."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import NamedTuple

import torch

from cxr.params import CpuBf16


class Mode(NamedTuple):
    bf16: bool = False  # autocast to bfloat16 in training steps (no loss scaling needed)
    channels_last: bool = False  # NHWC memory layout of the model and its batches

    @property
    def name(self) -> str:
        return "bf16+channels_last" if self.bf16 and self.channels_last else \
            "bf16" if self.bf16 else "float32+channels_last" if self.channels_last else "float32"


FLOAT32, FAST = Mode(), Mode(bf16=True, channels_last=True)

# Per arch, the fastest mode on a CPU with native bf16 (AMX-BF16 here), measured at 64 and 128 px, batch 64, by
# `python bench/train_speed.py` (docs/benchmarks.md): bf16 + channels_last gains 1.1-4.8x on the CNNs, bf16 alone
# 1.3x on the small ViT; the depthwise convolutions of MobileNet and EfficientNet gain from channels_last only (bf16
# slows them); linear and mlp train in seconds either way, within their timing noise, and stay float32.
CPU_MODES: dict[str, Mode] = {
    **dict.fromkeys(("cnn5", "cnn_baseline", "cnn_deep", "resnet18", "resnet50", "tinyvgg", "vgg16", "vit_b_16",
                     "xrnet"), FAST),
    "vit": Mode(bf16=True),
    **dict.fromkeys(("efficientnet_b0", "mobilenet_v2"), Mode(channels_last=True)),
}


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware: x86's AMX-BF16 or AVX512-BF16, Arm's BF16 (as
    torch's cpuinfo reads them from CPUID or the Arm feature registers)."""
    caps = torch.cpu.get_capabilities()
    return any(caps.get(flag) for flag in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))


def training_mode(device: torch.device, arch: str, setting: CpuBf16 = "auto") -> Mode:
    """What the training steps of `arch` use on `device`: `auto` its CPU_MODES entry where the CPU has native
    bf16, else float32; `on` bf16 + channels_last on any CPU (emulated where it has no native bf16: slow); `off`
    float32."""
    if device.type == "cuda" or setting == "on":
        return FAST
    return CPU_MODES.get(arch, FLOAT32) if setting == "auto" and native_bf16() else FLOAT32


def autocast(device: torch.device, mode: Mode) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.bf16)
