"""The CUDA device's peak memory bandwidth and bf16 tensor-core rate, to put achieved figures against.

    bandwidth  = 2 (double data rate) * memory_clock_rate * memory_bus_width / 8    bytes/s
    bf16 peak  = multi_processor_count * clock_rate * DENSE_BF16_FLOPS_PER_SM_CLOCK[(major, minor)]

(both from ``torch.cuda.get_device_properties``; e.g. A100-SXM4-80GB: 2.04 TB/s, 312 TFLOP/s;
H100-SXM: 3.35 TB/s, 989 TFLOP/s). Only a GPU has these figures: on CPU the benchmarks print
:data:`NEEDS_GPU` in their place instead of a number.
"""

from __future__ import annotations

import torch

NEEDS_GPU = "needs a GPU"

# Dense (no sparsity) bf16/fp16 tensor-core FLOPs per SM per clock with fp32 accumulation.
DENSE_BF16_FLOPS_PER_SM_CLOCK = {(8, 0): 2048, (8, 6): 512, (8, 7): 512, (8, 9): 512, (9, 0): 4096}


def gpu_peak() -> dict | None:
    """``{"gpu", "peak_bandwidth_GBps", "peak_bf16_TFLOPs"}`` of the current CUDA device (the
    TFLOP/s is None for an architecture not in the table), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    bandwidth = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
    per_clock = DENSE_BF16_FLOPS_PER_SM_CLOCK.get((props.major, props.minor))
    flops = None if per_clock is None else props.multi_processor_count * props.clock_rate * 1e3 * per_clock
    return {
        "gpu": props.name,
        "peak_bandwidth_GBps": bandwidth / 1e9,
        "peak_bf16_TFLOPs": None if flops is None else flops / 1e12,
    }


def fraction_of_peak(achieved: float | None, peak: float | None, device: str) -> float | str | None:
    """``achieved / peak`` for a measurement on ``device``: :data:`NEEDS_GPU` for ``"cpu"`` (no
    device peak applies); None when either figure is unknown."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return NEEDS_GPU
    if achieved is None or peak is None:
        return None
    if peak <= 0:
        raise ValueError(f"peak must be positive, got {peak}")
    return achieved / peak
