"""The CUDA device's peak memory bandwidth and dense FLOP rates, to put achieved figures against::

    bandwidth = 2 (double data rate) * memory_clock_rate * memory_bus_width / 8    bytes/s
    FLOP/s    = the vendor's published dense (no sparsity) figure, from :data:`PUBLISHED_PEAKS`

(not ``SMs * boost clock * FLOPs per clock``, which overstates e.g. an H100 SXM's 989 bf16 TFLOP/s as
~1070). A device not in the table gets None; on CPU the benchmarks print :data:`NEEDS_GPU`.
"""

from __future__ import annotations

import re

import torch

from fastkd.checks import check_choice, check_number

NEEDS_GPU = "needs a GPU"

# Published dense (no sparsity) peak rates in TFLOP/s per device: bf16 / fp16 on tensor cores with
# fp32 accumulation, tf32 on tensor cores, fp32 on the vector units (NVIDIA datasheets).
_A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
_H100_SXM = {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 67.0}
_H100_PCIE = {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}
# (pattern on the normalised device name, figures), first match wins; variants with other clocks or
# power limits (H100 / H200 NVL, ...) are deliberately absent: they get None rather than a wrong figure.
PUBLISHED_PEAKS = (
    ("NVL", None),
    ("H100 PCIE", _H100_PCIE),
    ("H100", _H100_SXM),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("H200", _H100_SXM),  # H200 (and GH200): the H100 SXM compute with more, faster memory
    ("A100", _A100),  # SXM4 and PCIe parts have the same compute peaks
)


def published_peak(name: str) -> dict | None:
    """``{"bf16", "fp16", "tf32", "fp32"}`` dense peak TFLOP/s of the device ``name`` (as torch spells
    it, e.g. ``"NVIDIA H100 80GB HBM3"``), or None for a device not in :data:`PUBLISHED_PEAKS`."""
    normalised = " ".join(re.sub(r"[-_]", " ", name).upper().split())
    figures = next((figures for pattern, figures in PUBLISHED_PEAKS if pattern in normalised), None)
    return None if figures is None else dict(figures)


def gpu_peak() -> dict | None:
    """``{"gpu", "peak_bandwidth_GBps", "peak_<bf16|fp16|tf32|fp32>_TFLOPs"}`` of the current CUDA
    device (bandwidth None when torch does not report the memory clock), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    figures = published_peak(props.name) or {}
    return {"gpu": props.name, "peak_bandwidth_GBps": 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
            if clock_khz and bus_bits else None,
            **{f"peak_{kind}_TFLOPs": figures.get(kind) for kind in ("bf16", "fp16", "tf32", "fp32")}}


def fraction_of_peak(achieved: float | None, peak: float | None, device: str) -> float | str | None:
    """``achieved / peak``: :data:`NEEDS_GPU` on ``"cpu"``, None when either figure is unknown."""
    check_choice("device", device, ("cpu", "cuda"))
    if device == "cpu":
        return NEEDS_GPU
    if peak is not None:
        check_number("peak", peak, low=0, low_open=True)
    return None if achieved is None or peak is None else achieved / peak
