"""Prototype: exp-bound ops rebuilt from arithmetic that MLX's CPU JIT compiles well.

Why: on x86 the `mlx[cpu]` wheel has no SIMD and no FMA, so `mx.exp` (and sigmoid, softmax,
logsumexp, SiLU) runs at ~100 M elements/s: ~10 ns per element, most of a DPO step once the
BLAS is fast (shared/reference/perf-mlx-cpu.md §2a). The same exp written as a range reduction
(2^n * 2^f), a degree-6 polynomial and an exponent-bit shift is plain mul/add/convert, which
`mx.compile` fuses into one JIT-compiled C++ loop: ~6x faster, with a relative error of
~3e-7 (mx.exp's own is ~5e-7 against float64).

Everything here has an exact custom VJP (the bit trick has no useful autodiff), so gradients
are those of the true function evaluated with the fast exp. Used by `bench.py` as the
`fastexp` variant; `use_fast_ops(model)` swaps them in for one model family's module globals
(attention and SwiGLU) and for `mlx_dpo.logps.lean_token_logps`.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import replace

import mlx.core as mx

LOG2E = 1.4426950408889634
ROUND = 12582912.0  # 1.5 * 2**23: (t + ROUND) - ROUND rounds t to an integer without floorf
# Taylor coefficients of 2^f = exp(f ln 2), f in [-0.5, 0.5]; degree 6: rel. error < 3e-7.
_C = (
    1.0,
    0.6931471805599453,
    0.2402265069591007,
    0.05550410866482158,
    0.009618129107628477,
    0.0013333558146428443,
    0.00015403530393381606,
)


def _exp(x: mx.array) -> mx.array:
    t = mx.clip(x * LOG2E, -126.0, 127.0)
    n = (t + ROUND) - ROUND  # round to nearest; SSE2 has no vector floor on this build
    f = t - n
    p = _C[6]
    for c in _C[5::-1]:
        p = c + f * p
    # 2^n from the exponent bits. No `where(x < -87, 0, .)`: exp(-inf) gives 2^-126 ~ 1e-38,
    # harmless in a softmax, and the select would keep x alive past the fused kernel.
    return p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)


fast_exp_fwd = mx.compile(_exp)  # not shapeless: `view` cannot infer shapes


@mx.custom_function
def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for float32 x; fused arithmetic, ~6x mx.exp on the x86 CPU build."""
    return fast_exp_fwd(x)


@fast_exp.vjp
def _fast_exp_vjp(x, cotangent, output):
    # one input: MLX passes and expects bare arrays, not tuples
    return cotangent * output


@mx.custom_function
def fast_logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis (keepdims=False)."""
    m = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    m = mx.where(mx.isinf(m), 0.0, m)
    return (mx.log(fast_exp_fwd(x - m).sum(axis=-1, keepdims=True)) + m)[..., 0]


@fast_logsumexp.vjp
def _fast_logsumexp_vjp(x, cotangent, output):
    return cotangent[..., None] * fast_exp_fwd(x - output[..., None])


def _fast_lse(x: mx.array) -> mx.array:
    # no custom VJP (the caller has one): a custom_function here keeps its input tile alive
    m = x.max(axis=-1, keepdims=True)
    return (mx.log(fast_exp_fwd(x - m).sum(axis=-1, keepdims=True)) + m)[..., 0]


@mx.custom_function
def fast_softmax(x: mx.array) -> mx.array:
    """softmax over the last axis."""
    e = fast_exp_fwd(x - x.max(axis=-1, keepdims=True))
    return e * (1.0 / e.sum(axis=-1, keepdims=True))


@fast_softmax.vjp
def _fast_softmax_vjp(x, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


@mx.custom_function
def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's `swiglu`."""
    return _swiglu_fwd(gate, x)


@mx.compile
def _swiglu_fwd(gate, x):
    return gate * _sigmoid(gate) * x


@mx.compile
def _swiglu_bwd(gate, x, g):
    s = _sigmoid(gate)
    silu = gate * s
    return g * x * (s + silu * (1.0 - s)), g * silu


@fast_swiglu.vjp
def _fast_swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    return _swiglu_bwd(gate, x, cotangent)


def fast_sdpa(queries, keys, values, cache=None, scale: float = 1.0, mask=None, sinks=None):
    """mlx-lm's `scaled_dot_product_attention` for training (no cache): scores, fast softmax,
    values. Grouped-query heads share K/V through a broadcast, never a copy."""
    if cache is not None or sinks is not None:
        from mlx_lm.models.base import scaled_dot_product_attention

        return scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    B, H, T, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(B, Hkv, H // Hkv, T, D)
    scores = q @ mx.expand_dims(keys, 2).swapaxes(-1, -2)  # (B, Hkv, rep, T, S)
    if isinstance(mask, str):  # "causal"
        causal = mx.arange(T)[:, None] + (S - T) >= mx.arange(S)[None]
        scores = mx.where(causal, scores, -mx.inf)
    elif mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask
    out = fast_softmax(scores.astype(mx.float32)).astype(values.dtype) @ mx.expand_dims(values, 2)
    return out.reshape(B, H, T, -1)


def lean_token_logps_fast(
    hidden, head, targets, *, vocab_chunk: int = 8192, token_chunk: int = 256, fast: bool = True
):
    """`mlx_dpo.logps.lean_token_logps` with the tile logsumexp and the VJP's softmax tiles
    taken from the fused exp (same algorithm, same order). The VJP returns no weight gradient:
    in mlx_dpo the lean head is always frozen (LMHead.from_model refuses a LoRA-wrapped head).
    The fused exp allocates ~2 more tile-sized buffers per tile (`view` splits the kernel), so
    the vocabulary tile is halved to keep the original's peak. `fast=False` gives the original
    exps (for A/B runs)."""
    vocab_chunk = min(vocab_chunk, 4096) if fast else vocab_chunk
    from mlx_dpo.logps import _after, _tiles

    token_tiles = _tiles(hidden.shape[0], token_chunk)
    vocab_tiles = _tiles(head.vocab_size, vocab_chunk)
    lse_fn = _fast_lse if fast else (lambda z: mx.logsumexp(z, axis=-1))  # noqa: E731
    exp_fn = fast_exp_fwd if fast else mx.exp

    @mx.custom_function
    def token_logps(hidden, targets, arrays):
        w, h = replace(head, arrays=arrays), hidden.astype(mx.float32)
        lse, lse_rows = None, []
        for t in token_tiles:
            for v in vocab_tiles:
                tile = lse_fn(_after(h[t], lse) @ w.rows(v).T)
                lse = tile if v.start == 0 else mx.logaddexp(lse, tile)
            lse_rows.append(lse)
        return (h * w.rows(targets)).sum(-1) - mx.concatenate(lse_rows)

    @token_logps.vjp
    def token_logps_vjp(primals, cotangent, output):
        hidden, targets, arrays = primals
        w, h, g = replace(head, arrays=arrays), hidden.astype(mx.float32), cotangent[:, None]
        w_target = w.rows(targets)
        lse = (h * w_target).sum(-1) - output
        grad_h, expected = [], None
        for t in token_tiles:
            for v in vocab_tiles:
                rows = w.rows(v)
                p = exp_fn(_after(h[t], expected) @ rows.T - lse[t, None])
                expected = p @ rows if v.start == 0 else expected + p @ rows
            grad_h.append(g[t] * (w_target[t] - expected))
        grads = {k: mx.zeros_like(a) for k, a in arrays.items()}  # frozen head
        return mx.concatenate(grad_h).astype(hidden.dtype), mx.zeros_like(targets), grads

    return token_logps(hidden, targets.astype(mx.int32), head.arrays)


@contextmanager
def use_fast_ops(model, *, attention=True, mlp=True, logps=True):
    """Swap the fast ops into the model's module (attention, SwiGLU) and into mlx_dpo.logps
    for the duration; whatever is traced or compiled inside keeps them."""
    import mlx_dpo.logps as logps_mod

    module = sys.modules[type(model).__module__]
    patches = []
    if attention and hasattr(module, "scaled_dot_product_attention"):
        patches.append((module, "scaled_dot_product_attention", fast_sdpa))
    if mlp and hasattr(module, "swiglu"):
        patches.append((module, "swiglu", fast_swiglu))
    if logps:
        patches.append((logps_mod, "lean_token_logps", lean_token_logps_fast))
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    for m, name, fn in patches:
        setattr(m, name, fn)
    try:
        yield [f"{m.__name__}.{name}" for m, name, _ in patches]
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)
