"""Peak-throughput references for MFU: a table for GPUs, a measured matmul on CPU."""
from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, no sparsity).
GPU_PEAK_TFLOPS = {
    "A100": 312.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A10G": 125.0,
    "L4": 121.0,
    "L40S": 362.0,
    "V100": 125.0,  # fp16
}


def gpu_peak_tflops(device_name: str) -> float | None:
    """Peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None when unknown."""
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in device_name:
            return GPU_PEAK_TFLOPS[key]
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                          seconds: float = 0.3) -> float:
    """Achieved TFLOP/s of a square matmul on this device with the current thread count."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm up kernels and thread pools
    _sync(device)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        iters += 1
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float, str]:
    """The MFU denominator and where it came from."""
    if override:
        return override, "config train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = gpu_peak_tflops(name)
        if table:
            return table, f"datasheet bf16 peak of {name}"
    return measure_matmul_tflops(device, dtype), f"measured {dtype} matmul on {device.type}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
