"""Would pre-packed frozen weights speed up the update's GEMMs? (benchmarks/RESULTS.md 1n)

    python benchmarks/gemm_packed.py      # in the project's venv (the `mkl` wheel comes with it)

Times MKL's sgemm at the frozen projections' shapes (SmolLM2-135M: 576 -> 1,536, 1,536 -> 576,
576 -> 576, 576 -> 192; 191-764 rows, the shapes of 1-4 pairs of 128 tokens) three ways, 1
thread: x W^T with W as stored (how MLX calls it), x W with the weight stored transposed, and x
times a weight packed once by `cblas_sgemm_pack` (`cblas_sgemm_compute`: no packing per call).
Prints ms and GFLOP/s, best of 5 x 50 calls.
"""

from __future__ import annotations

import ctypes
import sys
import time

import numpy as np

from mlx_dpo._blas import _mkl_candidates

ROW_MAJOR, NO_TRANS, TRANS, PACKED, PACK_B = 101, 111, 112, 151, 162
NAMES = ("x W^T", "x W (stored transposed)", "packed W")


def _mkl() -> ctypes.CDLL:
    found = _mkl_candidates()  # where mlx_dpo's own preload finds the wheel's libmkl_rt
    if not found:
        sys.exit("no libmkl_rt in this venv: pip install mkl")
    lib = ctypes.CDLL(found[0])
    lib.MKL_Set_Num_Threads(1)
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    return lib


def _best_ms(fn, calls: int = 50, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e3


def products(lib, x: np.ndarray, w: np.ndarray) -> dict[str, tuple]:
    """The three calls of x (M x K, float32) by a weight (N x K), each as (function, the array
    it writes x W^T into)."""
    f, ptr = ctypes.c_float, lambda a: a.ctypes.data_as(ctypes.c_void_p)
    (M, K), N = x.shape, w.shape[0]
    wt = np.ascontiguousarray(w.T)
    packed = np.zeros(lib.cblas_sgemm_pack_get_size(PACK_B, M, N, K) // 4 + 16, np.float32)
    lib.cblas_sgemm_pack(ROW_MAJOR, PACK_B, TRANS, M, N, K, f(1), ptr(w), K, ptr(packed))
    y0, y1, y2 = ys = [np.zeros((M, N), np.float32) for _ in NAMES]
    calls = (  # in the order of NAMES
        lambda: lib.cblas_sgemm(
            ROW_MAJOR, NO_TRANS, TRANS, M, N, K, f(1), ptr(x), K, ptr(w), K, f(0), ptr(y0), N
        ),
        lambda: lib.cblas_sgemm(
            ROW_MAJOR, NO_TRANS, NO_TRANS, M, N, K, f(1), ptr(x), K, ptr(wt), N, f(0), ptr(y1), N
        ),
        lambda: lib.cblas_sgemm_compute(
            ROW_MAJOR, NO_TRANS, PACKED, M, N, K, ptr(x), K, ptr(packed), N, f(0), ptr(y2), N
        ),
    )
    return dict(zip(NAMES, zip(calls, ys, strict=True), strict=True))


def time_shape(lib, M: int, K: int, N: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x, w = rng.random((M, K), np.float32), rng.random((N, K), np.float32)
    return {name: _best_ms(fn) for name, (fn, _) in products(lib, x, w).items()}


def main() -> None:
    lib = _mkl()
    for M in (191, 382, 764):
        for K, N in ((576, 1536), (1536, 576), (576, 576), (576, 192)):
            ms = time_shape(lib, M, K, N)
            gflop = 2 * M * K * N / 1e9
            cells = ", ".join(
                f"{k} {v:.3f} ms ({gflop / v * 1e3:.0f} GFLOP/s)" for k, v in ms.items()
            )
            print(f"{M} x {K} -> {N}: {cells}")


if __name__ == "__main__":
    main()
