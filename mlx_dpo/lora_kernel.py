"""The CPU path's `lora` kernel: a LoRA-adapted projection's forward and backward in one function.

mlx-lm's LoRALinear computes y = x W^T + scale * (x A) B. Autodiff of that writes, per adapted
projection and step, scale * z and its sum with x W^T in the forward, and scale * dy and the sum
of the frozen and the adapter's input gradients in the backward: four passes over
activation-sized arrays around rank-8 matmuls of 16 FLOPs an element. Here both sums happen
inside a GEMM (`mx.addmm`: the adapter's product accumulates into the frozen projection's
output, and the backward's dx likewise), the scale multiplies only rank-sized arrays, and
lora_a's gradient is taken as (g^T x)^T, the orientation the BLAS runs 2-3x faster at rank 8
(x^T g ran at 13-18 GFLOP/s, benchmarks/RESULTS.md 1g). The frozen weight gets no gradient.

`call` replaces `LoRALinear.__call__` where mlx_dpo.cpu_kernels is installed; it runs this
function or mlx-lm's own per shape class, whichever mlx_dpo.kernel_choice measured faster,
and mlx-lm's own wherever the layer is not a plain adapter over a float32 projection (dropout
on, a quantized kernel, another dtype).
"""

from __future__ import annotations

from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from mlx_dpo import kernel_choice

ORIGINAL_CALL = LoRALinear.__call__
SCALE = 20.0  # mlx-lm's default LoRA scale: the timings do not depend on its value


def _rows(t: mx.array) -> mx.array:
    return t.reshape(-1, t.shape[-1])


@cache
def fused(scale: float, bias: bool = False):
    """The custom function (x, W, A, B[, bias]) -> (x W^T [+ bias] + scale (x A) B, x A): the
    second output is kept for B's gradient, so that the backward need not recompute it."""

    @mx.custom_function
    def f(x, w, a, b, *c):
        u = x @ a
        y = mx.addmm(c[0], x, w.T) if c else x @ w.T
        return mx.addmm(y, u, b, alpha=scale), u

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        x, w, a, b = primals[:4]
        dy, u = cotangents[0], outputs[1]
        g = dy @ b.T
        dx = mx.addmm(dy @ w, g, a.T, alpha=scale)
        da = (scale * (_rows(g).T @ _rows(x))).T
        db = scale * (_rows(u).T @ _rows(dy))
        frozen = [mx.zeros_like(p) for p in primals[4:]]  # never evaluated: nothing asks for them
        return (dx, mx.zeros_like(w), da, db, *frozen)

    return f


def mlx_lm_adapter(x, w, a, b, scale: float = SCALE):
    """y = x W^T + scale (x A) B as mlx-lm's LoRALinear writes it: the baseline the kernels'
    timings adapt their projections with."""
    return x @ w.T + scale * ((x @ a) @ b)


def fused_adapter(x, w, a, b):
    """The same y through the fused function (mlx-lm's default scale), its output alone."""
    return fused(SCALE)(x, w, a, b)[0]


def adapter(x: mx.array, w: mx.array, a: mx.array):
    """The call an adapted projection of these shapes runs in the step, as (x, W, A, B) -> y:
    the fused function where `call` is routed and measured it faster, else mlx-lm's. For the
    kernels' timings that adapt projections around the kernel they time."""
    (d_in, r), d_out = a.shape, w.shape[0]
    routed = LoRALinear.__call__ is call and x.dtype == mx.float32
    if routed and choice(max(1, x.size // d_in), d_in, d_out, r) == "fused":
        return fused_adapter
    return mlx_lm_adapter


def _fusable(layer: LoRALinear, x: mx.array) -> bool:
    """A plain adapter (no dropout) over a float32 nn.Linear or a DequantLinear, on float32."""
    from mlx_dpo.model import DequantLinear

    base, drop = layer.linear, layer.dropout
    # nn.Dropout keeps 1 - p as `_p_1`; were that renamed, assume dropout is on (mlx-lm's call)
    if x.dtype != mx.float32 or (drop.training and getattr(drop, "_p_1", 0.0) < 1.0):
        return False
    return type(base) is DequantLinear or (type(base) is nn.Linear and base.weight.dtype == x.dtype)


def _base_weight(layer: LoRALinear, x: mx.array) -> mx.array:
    """The frozen projection's float32 weight, dequantized for DequantLinear as its own call
    does."""
    from mlx_dpo.model import DequantLinear, _dequantized

    base = layer.linear
    return _dequantized(base, x) if type(base) is DequantLinear else base.weight


def call(self: LoRALinear, x: mx.array) -> mx.array:
    """LoRALinear.__call__ through the fused function where it applies and was measured faster."""
    (d_in, r), d_out = self.lora_a.shape, self.lora_b.shape[-1]
    if not _fusable(self, x) or choice(max(1, x.size // d_in), d_in, d_out, r) != "fused":
        return ORIGINAL_CALL(self, x)
    w = _base_weight(self, x)
    bias = [self.linear["bias"]] if "bias" in self.linear else []
    f = fused(self.scale, bool(bias))
    return f(x, mx.stop_gradient(w), self.lora_a, self.lora_b, *map(mx.stop_gradient, bias))[0]


def choice(n_tokens: int, d_in: int, d_out: int, r: int) -> str:
    """The measured choice for an adapted projection d_in -> d_out of rank r on n_tokens."""
    shape = kernel_choice.shape_class("lora", N=n_tokens, I=d_in, O=d_out, R=r)
    return kernel_choice.chooser().choose("lora", shape, partial(bench, n_tokens, d_in, d_out, r))


def step_choice(dims, r: int, n_tokens: int, *, dropout: float, float32: bool):
    """The adapters' call a step of `n_tokens` tokens a block will run, for the memory plan:
    "fused" where `call` is routed and every adapted projection (`dims`: (d_in, d_out) pairs)
    takes the fused function, "mlx" where none does (mlx-lm's call, which holds more), else
    the sorted tuple of the (d_in, d_out) that keep mlx-lm's call."""
    if LoRALinear.__call__ is not call or dropout > 0 or not float32:
        return "mlx"
    # every shape class decided now (timed if not cached), as the step's first trace would
    kept = tuple(d for d in sorted(set(dims)) if choice(n_tokens, *d, r) != "fused")
    return "fused" if not kept else "mlx" if len(kept) == len(set(dims)) else kept


def bench(n_tokens: int, d_in: int, d_out: int, r: int) -> dict:
    """mlx-lm's adapter and the fused one, forward (its value evaluated, as the step's loss
    needs it) + backward to x, A and B (the frozen weight without a gradient, as in the step)."""
    from mlx_dpo.cpu_kernels import _grad_timer, _normal

    x = _normal((n_tokens, d_in), 0)
    w, a, b = _normal((d_out, d_in), 1) * 0.05, _normal((d_in, r), 2) * 0.05, _normal((r, d_out), 3)
    mx.eval(w)

    def plain(x, a, b):
        return mlx_lm_adapter(x, w, a, b)

    def one(x, a, b):
        return fused_adapter(x, w, a, b)

    return {
        "mlx": _grad_timer(plain, x, a, b),
        "fused": _grad_timer(one, x, a, b),
    }


def use(on: bool) -> None:
    """Route every LoRALinear of the process through `call` (on) or mlx-lm's own (off)."""
    LoRALinear.__call__ = call if on else ORIGINAL_CALL
