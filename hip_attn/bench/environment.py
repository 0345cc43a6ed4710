"""Where a run happens: device, software versions, git commit, and default output paths.

Torch-free at import (the CLI imports it for ``--help``); functions that look at a device import
torch when called.
"""

from __future__ import annotations

import datetime
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

#: Default folder of results, relative to the current directory (the repository root).
RESULTS_DIR = Path("bench") / "results"
#: File name stem of CPU runs; GPU runs use the device name (``nvidia-h100-80gb-hbm3``).
CPU_STEM = "cpu-smoke"

#: GPU name fragments -> preset of the analytic model (first match wins).
_GPU_PRESETS = (
    ("h200", "h200"),
    ("h100", "h100-sxm"),
    ("a100", "a100-80g"),
    ("l40s", "l40s"),
    ("4090", "rtx-4090"),
)


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def result_stem(device_name: str, device_type: str) -> str:
    """File name stem of a device's results: ``cpu-smoke`` for the CPU, else the GPU's slug."""
    return CPU_STEM if device_type != "cuda" else slug(device_name)


def default_output(device_name: str, device_type: str) -> Path:
    """``bench/results/<gpu-slug>.jsonl`` on a GPU, ``bench/results/cpu-smoke.jsonl`` on CPU."""
    return RESULTS_DIR / f"{result_stem(device_name, device_type)}.jsonl"


def gpu_preset_for(device_name: str) -> tuple[str, str | None]:
    """The analytic model's GPU preset for a device name, and a note when it is a guess."""
    lower = device_name.lower()
    for fragment, preset in _GPU_PRESETS:
        if fragment in lower:
            note = None
            if preset == "h100-sxm" and ("pcie" in lower or "nvl" in lower):
                note = f"{device_name} is not an H100 SXM; pass --gpu or expect a lower floor"
            return preset, note
    return "h100-sxm", f"no preset matches {device_name!r}; predicting for h100-sxm (use --gpu)"


def git_commit() -> dict[str, Any]:
    """``{"commit": sha or "unknown", "dirty": bool or None}`` of the source tree of this
    package (read-only git commands; no index refresh)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": sha or "unknown", "dirty": bool(status.strip())}


def environment(device: Any) -> dict[str, Any]:
    """Device name and kind, software versions and the commit, for every record.

    Args:
        device: a ``torch.device``.
    """
    import torch

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, Any] = {
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "git": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=torch.cuda.get_device_name(device),
            device_memory_bytes=int(props.total_memory),
            sm_count=int(props.multi_processor_count),
        )
    else:
        info.update(device="cpu", cpu=platform.processor() or platform.machine())
    return info
