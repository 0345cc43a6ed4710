"""GPU descriptions: peak numbers of the presets, overrides and efficiency factors.

All fields are in base SI units (FLOP/s, bytes/s, bytes) so the estimator never converts.
Peaks are datasheet figures for dense BF16 tensor-core math (no structured sparsity) and
nominal link rates per direction; measured numbers go in through overrides or ``Efficiency``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hip_attn.perf.units import parse_size

GB = 10**9
GiB = 2**30
TFLOPS = 10**12

PCIE_GEN4_X16 = 32 * GB  # nominal, per direction
PCIE_GEN5_X16 = 64 * GB
US = 1e-6
#: Latency floors (docs/roofline.md, "Latency floors"): one eager kernel launch costs about
#: 5 us of issue time (driver + runtime 4-6 us measured on an RTX 5070 Ti, CUDA 13, in
#: "pegainfer (3): From Launch Overhead to CUDA Graph"; PyTorch's dispatcher adds to it), and
#: one dependent DRAM round trip about 0.5 us on HBM parts and 0.6 us on GDDR parts
#: (pointer-chasing latencies of the order Jia et al. measured, "Dissecting the NVIDIA Volta GPU
#: Architecture via Microbenchmarking", 2018, plus the L2 miss path of larger dies).
LAUNCH = 5 * US
HBM_LATENCY = 0.5 * US
GDDR_LATENCY = 0.6 * US


@dataclass(frozen=True)
class GPUSpec:
    """One GPU as the model sees it.

    Attributes:
        name: preset name or a label of a custom GPU.
        flops: peak dense matmul throughput in FLOP/s (BF16 tensor cores for the presets).
        hbm_bandwidth: device memory bandwidth in bytes/s.
        hbm: device memory capacity in bytes.
        host_link: host<->GPU bandwidth in bytes/s, one direction (PCIe).
        gpu_link: GPU<->GPU bandwidth in bytes/s, one direction (NVLink, or PCIe without it);
            used for tensor-parallel all-reduce.
        note: where the numbers come from.
        launch_latency: fixed seconds one kernel launch costs, back to back from Python (eager,
            no CUDA graph): the launch floor every kernel pays whatever its size.
        memory_latency: seconds of one dependent HBM round trip (a load whose address comes
            from an earlier load: a gather through an index, a search level).
    """

    name: str
    flops: float
    hbm_bandwidth: float
    hbm: int
    host_link: float
    gpu_link: float
    note: str = ""
    launch_latency: float = 5e-6
    memory_latency: float = 0.5e-6

    def __post_init__(self) -> None:
        for field_name in (
            "flops",
            "hbm_bandwidth",
            "hbm",
            "host_link",
            "gpu_link",
            "launch_latency",
            "memory_latency",
        ):
            value = getattr(self, field_name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"GPU {field_name} must be a positive number, got {value!r}")

    @property
    def ridge_point(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the compute roof meets the HBM slope."""
        return self.flops / self.hbm_bandwidth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak actually reached (1.0 = peak, the default everywhere).

    Attributes:
        compute: of ``GPUSpec.flops``.
        hbm: of ``GPUSpec.hbm_bandwidth``.
        host_link: of ``GPUSpec.host_link``.
        gpu_link: of ``GPUSpec.gpu_link``.
    """

    compute: float = 1.0
    hbm: float = 1.0
    host_link: float = 1.0
    gpu_link: float = 1.0

    def __post_init__(self) -> None:
        for field_name in ("compute", "hbm", "host_link", "gpu_link"):
            value = getattr(self, field_name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{field_name} efficiency must be in (0, 1], got {value!r}")

    def apply(self, gpu: GPUSpec) -> GPUSpec:
        """The GPU with its peaks scaled by these factors (what the estimator computes with)."""
        if self == Efficiency():
            return gpu
        return replace(
            gpu,
            flops=gpu.flops * self.compute,
            hbm_bandwidth=gpu.hbm_bandwidth * self.hbm,
            host_link=gpu.host_link * self.host_link,
            gpu_link=gpu.gpu_link * self.gpu_link,
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


GPU_PRESETS: dict[str, GPUSpec] = {
    spec.name: spec
    for spec in (
        GPUSpec(
            "a100-80g",
            312 * TFLOPS,
            2039 * GB,
            80 * GiB,
            PCIE_GEN4_X16,
            300 * GB,
            "A100 SXM4 80GB: 312 TFLOP/s bf16, 2039 GB/s HBM2e, PCIe Gen4 x16, NVLink3 600 GB/s",
            LAUNCH,
            HBM_LATENCY,
        ),
        GPUSpec(
            "a100-40g",
            312 * TFLOPS,
            1555 * GB,
            40 * GiB,
            PCIE_GEN4_X16,
            300 * GB,
            "A100 SXM4 40GB (NVIDIA A100 datasheet): 312 TFLOP/s bf16, 1555 GB/s HBM2, "
            "PCIe Gen4 x16, NVLink3 600 GB/s",
            LAUNCH,
            HBM_LATENCY,
        ),
        GPUSpec(
            "h100-sxm",
            989 * TFLOPS,
            3350 * GB,
            80 * GiB,
            PCIE_GEN5_X16,
            450 * GB,
            "H100 SXM5 80GB: 989 TFLOP/s bf16, 3350 GB/s HBM3, PCIe Gen5 x16, NVLink4 900 GB/s",
            LAUNCH,
            HBM_LATENCY,
        ),
        GPUSpec(
            "h100-pcie",
            756 * TFLOPS,
            2000 * GB,
            80 * GiB,
            PCIE_GEN5_X16,
            300 * GB,
            "H100 PCIe 80GB (NVIDIA H100 datasheet): 756 TFLOP/s bf16, 2000 GB/s HBM2e, PCIe "
            "Gen5 x16, NVLink bridge 600 GB/s",
            LAUNCH,
            HBM_LATENCY,
        ),
        GPUSpec(
            "h200",
            989 * TFLOPS,
            4800 * GB,
            141 * GB,
            PCIE_GEN5_X16,
            450 * GB,
            "H200 SXM 141GB: 989 TFLOP/s bf16, 4800 GB/s HBM3e, PCIe Gen5 x16, NVLink4 900 GB/s",
            LAUNCH,
            HBM_LATENCY,
        ),
        GPUSpec(
            "b200",
            2250 * TFLOPS,
            8000 * GB,
            180 * GB,
            PCIE_GEN5_X16,
            900 * GB,
            "B200 (NVIDIA HGX B200 datasheet, per GPU): 2.25 PFLOP/s dense bf16 (4.5 with "
            "sparsity), 8 TB/s HBM3e, 180 GB, PCIe Gen5 x16, NVLink5 1.8 TB/s",
            LAUNCH,
            HBM_LATENCY,
        ),
        GPUSpec(
            "l40s",
            362 * TFLOPS,
            864 * GB,
            48 * GB,
            PCIE_GEN4_X16,
            PCIE_GEN4_X16,
            "L40S 48GB: 362 TFLOP/s bf16, 864 GB/s GDDR6, PCIe Gen4 x16, no NVLink",
            LAUNCH,
            GDDR_LATENCY,
        ),
        GPUSpec(
            "l40",
            181 * TFLOPS,
            864 * GB,
            48 * GB,
            PCIE_GEN4_X16,
            PCIE_GEN4_X16,
            "L40 48GB (NVIDIA L40 datasheet): 181 TFLOP/s bf16 (362 with sparsity), 864 GB/s "
            "GDDR6, PCIe Gen4 x16, no NVLink",
            LAUNCH,
            GDDR_LATENCY,
        ),
        GPUSpec(
            "a6000",
            155 * TFLOPS,
            768 * GB,
            48 * GB,
            PCIE_GEN4_X16,
            56 * GB,
            "RTX A6000 48GB (NVIDIA RTX A6000 datasheet): 155 TFLOP/s bf16 with fp32 accumulate "
            "(310 with sparsity), 768 GB/s GDDR6, PCIe Gen4 x16, NVLink bridge 112.5 GB/s",
            LAUNCH,
            GDDR_LATENCY,
        ),
        GPUSpec(
            "rtx-4090",
            165 * TFLOPS,
            1008 * GB,
            24 * GiB,
            PCIE_GEN4_X16,
            PCIE_GEN4_X16,
            "RTX 4090 24GB: 165 TFLOP/s bf16 (fp32 accumulate), 1008 GB/s GDDR6X, PCIe Gen4 x16",
            LAUNCH,
            GDDR_LATENCY,
        ),
    )
}

# JSON keys of a GPU file and flags share these units.
_JSON_UNITS = {
    "flops": TFLOPS,  # TFLOP/s
    "hbm_bandwidth": GB,  # GB/s
    "host_link": GB,  # GB/s
    "gpu_link": GB,  # GB/s
    "launch_latency": US,  # us
    "memory_latency": US,  # us
}


def get_gpu(name: str) -> GPUSpec:
    """The preset called ``name`` (case-insensitive).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    key = name.strip().lower()
    if key not in GPU_PRESETS:
        raise ValueError(f"unknown GPU {name!r}; choose one of: {', '.join(GPU_PRESETS)}")
    return GPU_PRESETS[key]


def override_gpu(gpu: GPUSpec, values: Mapping[str, Any]) -> GPUSpec:
    """``gpu`` with fields replaced, given in the CLI/JSON units.

    ``values`` may hold ``flops`` (TFLOP/s), ``hbm_bandwidth``, ``host_link``, ``gpu_link``
    (GB/s), ``launch_latency``, ``memory_latency`` (us), ``hbm`` (a size string such as
    ``"80GiB"`` or a number of GB) and ``name``; ``None`` values are ignored.

    Raises:
        ValueError: an unknown key or a value that is not a positive number.
    """
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key == "name":
            changes["name"] = str(value)
        elif key == "hbm":
            changes["hbm"] = parse_size(str(value))
        elif key in _JSON_UNITS:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf
            ):
                raise ValueError(f"GPU {key} must be a positive finite number, got {value!r}")
            changes[key] = float(value) * _JSON_UNITS[key]
        elif key != "note":
            valid = ", ".join(["name", "hbm", *_JSON_UNITS])
            raise ValueError(f"unknown GPU field {key!r}; valid fields: {valid}")
    if not changes:
        return gpu
    if "name" not in changes and gpu.name in GPU_PRESETS:
        changes["name"] = f"{gpu.name} (custom)"
    return replace(gpu, note=f"{gpu.note}; overridden: {', '.join(sorted(changes))}", **changes)


def load_gpu_file(path: str | Path, base: GPUSpec) -> GPUSpec:
    """Apply the fields of a JSON file (same keys and units as :func:`override_gpu`) to ``base``.

    Raises:
        ValueError: unreadable file, not a JSON object, or bad fields.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
        raise ValueError(f"cannot read GPU file {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"GPU file {str(path)!r} must hold a JSON object")
    return override_gpu(base, data)
