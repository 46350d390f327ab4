"""fastkd.benchmarks.gpu_peak on CPU: the published dense peaks per device name, through a faked
CUDA device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastkd.benchmarks import gpu_peak as gpu_peak_module
from fastkd.benchmarks.gpu_peak import NEEDS_GPU, fraction_of_peak, gpu_peak, published_peak

A100 = {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}
H100_SXM = {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 67.0}
H100_PCIE = {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}


@pytest.mark.parametrize(
    "name,expected",
    [
        ("NVIDIA A100-SXM4-80GB", A100),
        ("NVIDIA A100-SXM4-40GB", A100),
        ("NVIDIA A100 80GB PCIe", A100),
        ("NVIDIA A100-PCIE-40GB", A100),
        ("NVIDIA H100 80GB HBM3", H100_SXM),
        ("NVIDIA H100", H100_SXM),
        ("NVIDIA H100 PCIe", H100_PCIE),
        ("NVIDIA H200", H100_SXM),
        ("NVIDIA GH200 480GB", H100_SXM),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_published_dense_peaks(name, expected):
    assert published_peak(name) == expected


def _fake_device(monkeypatch, **props):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(**props))


def test_h100_sxm_reports_the_datasheet_not_the_boost_clock(monkeypatch):
    # 132 SMs at the 1.98 GHz boost clock would give 132 * 1.98e9 * 4096 = 1070 TFLOP/s
    _fake_device(monkeypatch, name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                 clock_rate=1_980_000, memory_clock_rate=2_619_000, memory_bus_width=5120)
    peak = gpu_peak()
    assert peak["gpu"] == "NVIDIA H100 80GB HBM3"
    assert peak["peak_bf16_TFLOPs"] == 989.0 and peak["peak_fp16_TFLOPs"] == 989.0
    assert peak["peak_tf32_TFLOPs"] == 494.7 and peak["peak_fp32_TFLOPs"] == 67.0
    assert peak["peak_bandwidth_GBps"] == pytest.approx(3352.3, abs=0.1)  # 2 * 2619 MHz * 5120 bit / 8


def test_a100_and_unknown_devices(monkeypatch):
    _fake_device(monkeypatch, name="NVIDIA A100-SXM4-80GB", major=8, minor=0, multi_processor_count=108,
                 clock_rate=1_410_000, memory_clock_rate=1_593_000, memory_bus_width=5120)
    peak = gpu_peak()
    assert peak["peak_bf16_TFLOPs"] == 312.0 and peak["peak_tf32_TFLOPs"] == 156.0
    assert peak["peak_fp32_TFLOPs"] == 19.5
    assert peak["peak_bandwidth_GBps"] == pytest.approx(2039.0, abs=0.1)
    _fake_device(monkeypatch, name="Some Future GPU", major=12, minor=0, multi_processor_count=10)
    peak = gpu_peak()  # no memory clock reported: bandwidth unknown too
    assert peak == {"gpu": "Some Future GPU", "peak_bandwidth_GBps": None, "peak_bf16_TFLOPs": None,
                    "peak_fp16_TFLOPs": None, "peak_tf32_TFLOPs": None, "peak_fp32_TFLOPs": None}
    assert fraction_of_peak(100.0, peak["peak_bf16_TFLOPs"], "cuda") is None


def test_no_cuda_and_fraction_of_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_peak() is None
    assert fraction_of_peak(494.5, 989.0, "cuda") == 0.5
    assert fraction_of_peak(1.0, 989.0, "cpu") == NEEDS_GPU
    with pytest.raises(ValueError, match="device"):
        fraction_of_peak(1.0, 2.0, "tpu")


def test_the_table_is_the_single_source():
    assert all(pattern == pattern.upper() for pattern, _ in gpu_peak_module.PUBLISHED_PEAKS)
