"""Datasheet memory bandwidth and dense peak FLOP/s of common NVIDIA GPUs, by the name CUDA reports.

The floors `puzzle bench` compares a decode step with: memory (bytes the step must read / HBM bandwidth) and
compute (its FLOPs / the dtype's dense tensor-core peak, without 2:4 sparsity; float32 at the non-tensor-core
rate, as torch runs float32 matmuls by default). Numbers are NVIDIA's published specifications.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

T = 1e12


@dataclass(frozen=True)
class DeviceSpec:
    name: str  # the product, as the datasheet names it
    bandwidth: float  # HBM / GDDR bytes per second
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s

    def peak(self, dtype: str) -> float | None:
        return self.peak_flops.get(dtype.removeprefix("torch."))


def _spec(name: str, tb_s: float, bf16_tflops: float, fp32_tflops: float, fp8_tflops: float | None = None
          ) -> DeviceSpec:
    """fp8_tflops: dense e4m3 tensor-core peak (Ada and Hopper; None where the GPU has no FP8 tensor cores)."""
    peaks = {"bfloat16": bf16_tflops * T, "float16": bf16_tflops * T, "float32": fp32_tflops * T}
    if fp8_tflops is not None:
        peaks["fp8"] = fp8_tflops * T
    return DeviceSpec(name, tb_s * T, peaks)


# (pattern on the lower-cased CUDA device name, spec); the first match wins, so variants come before families.
DATASHEETS: tuple[tuple[str, DeviceSpec], ...] = (
    (r"h200.*nvl", _spec("H200 NVL", 4.8, 835, 60, 1670)),
    (r"h200", _spec("H200 SXM", 4.8, 989, 67, 1979)),
    (r"h100.*nvl", _spec("H100 NVL", 3.9, 835, 60, 1670)),
    (r"h100.*pcie", _spec("H100 PCIe", 2.0, 756, 51, 1513)),
    (r"h100", _spec("H100 SXM", 3.35, 989, 67, 1979)),
    (r"a100.*(80gb.*pcie|pcie.*80gb)", _spec("A100 80GB PCIe", 1.935, 312, 19.5)),
    (r"a100.*80gb", _spec("A100 80GB SXM", 2.039, 312, 19.5)),
    (r"a100", _spec("A100 40GB", 1.555, 312, 19.5)),
    (r"l40s", _spec("L40S", 0.864, 362, 91.6, 733)),
    (r"\bl4\b", _spec("L4", 0.3, 121, 30.3, 242)),
    (r"\ba10\b", _spec("A10", 0.6, 125, 31.2)),
)


def datasheet(device_name: str) -> DeviceSpec | None:
    """The datasheet of a device by its CUDA name ("NVIDIA H100 80GB HBM3" -> H100 SXM); None when unknown."""
    name = device_name.lower()
    for pattern, spec in DATASHEETS:
        if re.search(pattern, name):
            return spec
    return None


def datasheet_named(product: str) -> DeviceSpec:
    """The datasheet of a product by the name it is listed under ("H200 SXM")."""
    for _, spec in DATASHEETS:
        if spec.name == product:
            return spec
    raise KeyError(f"no datasheet named {product!r}")


def datasheet_of_roofline(peak_flops: float, bandwidth: float, dtype: str = "bfloat16") -> DeviceSpec | None:
    """The datasheet GPU whose dense `dtype` peak and bandwidth are these (an analytic roofline's numbers ->
    the GPU they describe); None when no datasheet matches within 1%."""
    for _, spec in DATASHEETS:
        peak = spec.peak(dtype)
        if peak and abs(peak - peak_flops) <= 0.01 * peak and abs(spec.bandwidth - bandwidth) <= 0.01 * bandwidth:
            return spec
    return None
