"""Throughput bookkeeping for the trainer: MFU against a table of known accelerators, data-wait share.

Everything here runs on the host at log steps only; nothing forces a device synchronisation.
"""

from __future__ import annotations

import re
import time

import torch

# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity). Matched as whole words of the
# CUDA device name (`peak_for_name`), first match wins, so the more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835.0),  # 600 W PCIe card: the H100 NVL's figure, not the SXM part's 989
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
]


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None when unknown (CPU, unlisted GPU)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    """The table's peak for a CUDA device name, matching whole words: as a substring, "L4" matched "NVIDIA L40" (121
    instead of 181 TFLOP/s) and "H200" matched "NVIDIA GH200" (the same figure, by luck)."""
    for key, value in PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return value
    return None


def mfu(samples_per_s: float, flops_per_sample: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device: achieved FLOP/s over peak."""
    if not peak:
        return None
    return samples_per_s * flops_per_sample / (peak * 1e12)


class Throughput:
    """Samples, data-wait seconds and wall-clock time over one log interval: samples/s and the data-wait share are
    taken from them by the trainer's log row, with the time read after its host transfer (`elapsed`)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0
        self.data_wait = 0.0

    def add(self, samples: int, data_wait_s: float) -> None:
        self.samples += samples
        self.data_wait += data_wait_s

    def elapsed(self) -> float:
        """Seconds since the last reset. Read it after a host transfer of the device's results (the trainer's log
        row): before it, the steps still queued on the device are counted in `samples` but not in the time."""
        return max(time.perf_counter() - self.t0, 1e-9)
