"""`mlx_dpo doctor`: what this machine gives MLX, in a few lines."""

from __future__ import annotations

import os
import platform
import sys
import time

from mlx_dpo import _blas, cpu_kernels
from mlx_dpo.platform import Platform, cpu_model, detect


def _matmul_gflops() -> float:
    import mlx.core as mx

    n = 512
    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    t0 = time.perf_counter()
    for _ in range(5):
        mx.eval(a @ a)
    return 5 * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def backend_lines(plat: Platform | None = None) -> list[str]:
    import mlx.core as mx

    from mlx_dpo import memory

    plat = plat or detect()
    name = {"x86-cpu": "CPU (x86)", "arm-cpu": "CPU (arm)", "metal": "Metal", "cuda": "CUDA"}
    lines = [f"mlx {mx.__version__}: backend {name[plat.kind]}, default device {plat.backend}"]
    info = plat.device_info
    if info.get("device_name"):
        lines.append(f"device: {info['device_name']} ({info.get('architecture', '?')})")
    # Key names differ per backend (Metal has max_recommended_working_set_size); never assume one.
    for key in ("memory_size", "max_recommended_working_set_size", "total_memory"):
        if key in info:
            lines.append(f"{key.replace('_', ' ')}: {info[key] / 2**30:.1f} GiB")
    budget, source = memory.available_bytes(plat)
    lines.append(f"memory budget for training: {budget / 2**30:.1f} GiB ({source})")
    return lines


def report() -> str:
    import huggingface_hub
    import mlx_lm

    state = _blas.preload()
    lines = [f"python {sys.version.split()[0]} on {platform.system()} {platform.machine()}"]
    lines.append(f"cpu: {cpu_model()}")  # what the kernels' timing cache is keyed by
    lines += backend_lines()
    lines.append(f"mlx-lm {mlx_lm.__version__}")
    if sys.platform.startswith("linux"):
        lines.append(f"blas: {state.reason}")
        if state.kind == "mkl":
            layer = os.environ.get("MKL_THREADING_LAYER", "?")
            lines.append(
                f"blas: MKL threading {layer}; a system OpenBLAS is used instead when present, "
                "often faster on AMD CPUs (docs/linux-cpu.md)"
            )
        lines.append(f"cpu fp32 matmul 512^3: {_matmul_gflops():.0f} GFLOP/s")
    lines.append(f"cpu exp kernels: {cpu_kernels.describe()}")
    lines.append(
        f"huggingface-hub {huggingface_hub.__version__}, cache {huggingface_hub.constants.HF_HUB_CACHE}"
    )
    offline = huggingface_hub.constants.HF_HUB_OFFLINE  # the library's own reading of the variable
    lines.append(f"hub offline mode: {'on' if offline else 'off'} (HF_HUB_OFFLINE)")
    return "\n".join(lines)
