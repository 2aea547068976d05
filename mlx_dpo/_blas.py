"""Load a fast BLAS before MLX on Linux.

The Linux ``mlx[cpu]`` wheel links a reference (netlib) BLAS at ~8 GFLOP/s. Its ``cblas_sgemm``
wrapper calls ``sgemm_`` through the PLT, so an optimised library that exports ``sgemm_`` and is
loaded with ``RTLD_GLOBAL`` *before* ``mlx.core`` takes over every fp32 matmul (20-50x faster,
same numbers to ~1e-6; docs/linux-cpu.md). Loaded after ``mlx.core`` it silently does
nothing, so this module must run first; it never imports MLX itself.

On Linux x86_64 `pip install` brings the `mkl` wheel, so there is always one; a system OpenBLAS
is still preferred when present (faster on AMD CPUs, where MKL takes its AVX2 path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform
import sys
from dataclasses import dataclass

OPT_OUT_ENV = "MLX_DPO_NO_FAST_BLAS"
# Skip the search for a system OpenBLAS (the packaging test uses it to prove what the wheel alone
# gives on a machine without one).
NO_SYSTEM_ENV = "MLX_DPO_NO_SYSTEM_BLAS"


@dataclass
class BlasState:
    path: str | None = None  # the library that was loaded, if any
    kind: str | None = None  # "openblas" or "mkl"
    reason: str = "not tried"  # why nothing was loaded, or what was loaded


STATE = BlasState()


def _openblas_candidates() -> list[str]:
    # Never find_library("blas"): on a machine with only netlib's libblas3 it is the slow one.
    found = ctypes.util.find_library("openblas")
    triplet = f"{platform.machine()}-linux-gnu"
    paths = [
        f"/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0",
        f"/usr/lib/{triplet}/openblas-openmp/libopenblas.so.0",
        f"/usr/lib/{triplet}/libopenblas.so.0",
        "/usr/lib64/libopenblasp.so.0",
        "/usr/lib64/libopenblaso.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib64/libflexiblas.so.3",
        "/usr/lib/libopenblas.so.0",
        "/usr/lib/libopenblas.so.3",
        "/home/linuxbrew/.linuxbrew/opt/openblas/lib/libopenblas.so.0",
    ]
    if os.environ.get("CONDA_PREFIX"):
        paths.append(os.path.join(os.environ["CONDA_PREFIX"], "lib", "libopenblas.so.0"))
    return ([found] if found else []) + [p for p in paths if os.path.exists(p)]


def _mkl_candidates() -> list[str]:
    # The `mkl` wheel puts libmkl_rt in <prefix>/lib; it exports unprefixed cblas_* and sgemm_.
    prefixes = {sys.prefix, sys.base_prefix}
    return sorted(
        p for pre in prefixes for p in glob.glob(os.path.join(pre, "lib", "libmkl_rt.so*"))
    )


def preload() -> BlasState:
    """Load the fastest BLAS found (OpenBLAS, then MKL) with RTLD_GLOBAL. Idempotent."""
    if STATE.reason != "not tried":
        return STATE
    if not sys.platform.startswith("linux"):
        STATE.reason = "not needed on this platform"
    elif os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        STATE.reason = f"disabled by {OPT_OUT_ENV}"
    elif "mlx.core" in sys.modules:
        STATE.reason = "mlx.core was imported before mlx_dpo; a preload now would have no effect"
    else:
        _try_load()
    return STATE


def _mkl_threading() -> None:
    """MKL on GNU OpenMP (set before MKL loads; the user's own settings win), or sequential
    without that runtime. The OpenMP wait policy stays the runtime's default (spin briefly, then
    sleep). Measured on the demo, 2 cores, tokens/s: quiet machine default 3871 vs PASSIVE 1036;
    with one other CPU-bound process default 1280 vs PASSIVE 3517 (MKL_NUM_THREADS=1: 4012 and
    4794). A training machine is usually not shared, so the quiet case decides; docs/linux-cpu.md
    says what to set on a shared one."""
    if ctypes.util.find_library("gomp") is None:
        os.environ.setdefault("MKL_THREADING_LAYER", "SEQUENTIAL")
        return
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")


def _try_load() -> None:
    # OpenBLAS first: on AVX-512 CPUs it measured ~2x MKL's rate (MKL takes its AVX2 path on AMD).
    system = [] if os.environ.get(NO_SYSTEM_ENV, "") not in ("", "0") else _openblas_candidates()
    for kind, candidates in (("openblas", system), ("mkl", _mkl_candidates())):
        for path in candidates:
            if kind == "mkl":
                _mkl_threading()
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            STATE.path, STATE.kind = path, kind
            where = "the system's OpenBLAS" if kind == "openblas" else "MKL from the mkl wheel"
            STATE.reason = f"loaded {where} ({path}) for MLX's CPU matmuls"
            return
    STATE.reason = (
        "no fast BLAS found; MLX's CPU matmuls use the slow reference BLAS "
        "(`pip install mkl` in this environment, or a system OpenBLAS: see docs/linux-cpu.md)"
    )


def is_fast() -> bool:
    return STATE.path is not None
