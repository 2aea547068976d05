"""How much did timing gradients alone favour MLX's attention? (benchmarks/RESULTS.md 1p)

    MKL_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/attention_value.py

The kernels' timings (mlx_dpo.cpu_kernels) run each candidate's compiled forward + backward of
sum(out * a random cotangent). With `mx.grad` alone MLX skips forward work no gradient reads:
MLX attention's P V (its backward needs the probabilities, not the output), which the flash
kernel's backward reads and the step computes anyway. This times MLX's attention and each
flash tile at a few grid shapes both ways: the gradient only, and with the value evaluated too
(`mx.value_and_grad`, what `cpu_kernels._grad_timer` runs). Prints ms, best of 7.
"""

from __future__ import annotations

from functools import partial

from mlx_dpo import _blas

_blas.preload()  # the fast BLAS, before the first import of mlx.core
import mlx.core as mx  # noqa: E402
from mlx_lm.models.base import scaled_dot_product_attention as mlx_attention  # noqa: E402
from swiglu_in_mlp import best_ms  # noqa: E402

from mlx_dpo import cpu_kernels as ck  # noqa: E402

SHAPES = [(2, 9, 3, 128, 64), (2, 9, 3, 512, 64), (4, 9, 3, 1024, 64), (2, 14, 2, 512, 64)]


def timer(fn, arrays, value: bool):
    """With `value`, the kernels' own timer; without, the gradient alone (their timer before)."""
    if value:
        return ck._grad_timer(fn, *arrays)
    out = fn(*arrays)
    ct = ck._normal(out.shape, 9)

    def loss(*a):
        return (fn(*a) * ct).sum()

    step = mx.compile(mx.grad(loss, argnums=tuple(range(len(arrays)))))
    mx.eval(ct, *arrays)
    return lambda: mx.eval(step(*arrays))


def main() -> None:
    candidates = {"mlx": mlx_attention}
    candidates |= {n: partial(ck.scaled_dot_product_attention, block=b) for n, b in ck.FLASH_BLOCKS.items()}  # fmt: skip
    print("B x heads (kv) x T x D | candidate | gradient only ms | with value ms")
    for B, H, Hkv, T, D in SHAPES:
        q = ck._normal((B, H, T, D), 0)
        k, v = (ck._normal((B, Hkv, T, D), i) for i in (1, 2))
        for name, f in candidates.items():
            fn = partial(lambda q, k, v, f, s: f(q, k, v, None, s, "causal"), f=f, s=D**-0.5)
            ms = [best_ms(timer(fn, (q, k, v), value), 7) for value in (False, True)]
            print(f"{B} x {H} ({Hkv}) x {T} x {D} | {name} | {ms[0]:.1f} | {ms[1]:.1f}", flush=True)


if __name__ == "__main__":
    main()
