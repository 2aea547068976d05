#!/usr/bin/env python
"""Time the SwiGLU candidates alone and inside their MLP block (gate/up GEMMs, activation,
down GEMM), compiled forward + backward, on one shape: what kernel_choice measures against
what the training step sees.

    python benchmarks/swiglu_in_mlp.py ROWS HIDDEN INTERMEDIATE   # e.g. 16384 256 704
"""

import sys
import time

from mlx_dpo import cpu_kernels as ck  # the package preloads the fast BLAS before MLX


def best_ms(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    import mlx.core as mx  # after mlx_dpo: its BLAS preload must come first

    n, h, i = (int(a) for a in sys.argv[1:4])
    x = mx.random.normal((n, h)) * 0.5
    w_gate, w_up = (mx.random.normal((i, h)) * 0.05 for _ in range(2))
    w_down = mx.random.normal((h, i)) * 0.05
    ct = mx.random.normal((n, h))
    out = {}
    for name, act in (("mlx", ck._mlx_swiglu), ("fused", ck.swiglu)):

        def loss(x, g, u, d, act=act):
            return ((act(x @ g.T, x @ u.T) @ d.T) * ct).sum()

        grad = mx.compile(mx.grad(loss, argnums=(0, 1, 2, 3)))
        out[f"{name} in MLP"] = best_ms(lambda g=grad: mx.eval(g(x, w_gate, w_up, w_down)))
        out[f"{name} alone"] = best_ms(ck._grad_timer(act, x @ w_gate.T, x @ w_up.T))
    print(f"{n} x {h} -> {i}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out.items()))


if __name__ == "__main__":
    main()
