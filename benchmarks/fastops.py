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

# Causal attention goes in query blocks of this many positions, each against only the keys it
# can see. The boundaries are fixed multiples (not T / n), so a row's result does not depend on
# how far its batch is padded: the reference and the policy at step 0 agree bit for bit.
ATTENTION_BLOCK = 64
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


def _causal_blocks(T: int) -> list[tuple[int, int, int]]:
    """(first query, end of queries, end of keys) per block. Keys run to the block's full end
    (K/V padded up to a multiple of ATTENTION_BLOCK), so a row's sums never depend on T."""
    n = ATTENTION_BLOCK
    return [(a, min(a + n, T), a + n) for a in range(0, T, n)]


def _pad_keys(x: mx.array, to: int) -> mx.array:
    extra = to - x.shape[-2]
    return x if extra == 0 else mx.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])


def _visible(a: int, b: int, kb: int) -> mx.array:
    return mx.arange(a, b)[:, None] >= mx.arange(kb)[None]


def fast_sdpa(queries, keys, values, cache=None, scale: float = 1.0, mask=None, sinks=None):
    """mlx-lm's `scaled_dot_product_attention` for training (no cache): scores, fast softmax,
    values. Grouped-query heads share K/V through a broadcast, never a copy. A causal mask is
    exploited, not just applied: queries go in blocks, each against only the keys it can see
    (at T = 256, 10/16 of the T x T scores: fewer FLOPs, passes and saved bytes)."""
    if cache is not None or sinks is not None:
        from mlx_lm.models.base import scaled_dot_product_attention

        return scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    B, H, T, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(B, Hkv, H // Hkv, T, D)
    k, v = mx.expand_dims(keys, 2), mx.expand_dims(values, 2)  # (B, Hkv, 1, S, D)
    if isinstance(mask, str) and T == S:  # "causal", no cache offset
        blocks = _causal_blocks(T)
        k, v = _pad_keys(k, blocks[-1][2]), _pad_keys(v, blocks[-1][2])
        out = []
        for a, b, kb in blocks:
            scores = q[..., a:b, :] @ k[..., :kb, :].swapaxes(-1, -2)  # (.., b - a, kb)
            scores = mx.where(_visible(a, b, kb), scores, -mx.inf)
            probs = fast_softmax(scores.astype(mx.float32))
            out.append(probs.astype(values.dtype) @ v[..., :kb, :])
        return mx.concatenate(out, axis=-2).reshape(B, H, T, -1)
    scores = q @ k.swapaxes(-1, -2)  # (B, Hkv, rep, T, S)
    if isinstance(mask, str):  # causal with an offset
        causal = mx.arange(T)[:, None] + (S - T) >= mx.arange(S)[None]
        scores = mx.where(causal, scores, -mx.inf)
    elif mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask
    out = fast_softmax(scores.astype(mx.float32)).astype(values.dtype) @ v
    return out.reshape(B, H, T, -1)


def flash_sdpa(queries, keys, values, cache=None, scale: float = 1.0, mask=None, sinks=None):
    """Causal attention with a custom VJP that keeps only q, k, v, the output and one
    logsumexp per query for the backward, and recomputes each block's probabilities there
    (FlashAttention's algorithm, in MLX ops): memory linear in T instead of rows x heads x T^2
    per block. Query blocks see only the keys they can (as fast_sdpa). Anything but plain
    causal self-attention goes to fast_sdpa."""
    B, H, T, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    if cache is not None or sinks is not None or mask != "causal" or T != S:
        return fast_sdpa(queries, keys, values, cache, scale, mask, sinks)
    blocks = _causal_blocks(T)

    def probs(q, k, a, b, kb, lse=None, after=None):
        # `after` chains the blocks: without it MLX runs every block's matmul first and holds
        # all their scores at once (T^2 again)
        qa = q[..., a:b, :] if after is None else mx.depends(q[..., a:b, :], after)
        scores = qa @ k[..., :kb, :].swapaxes(-1, -2)  # (B, Hkv, rep, b - a, kb)
        scores = mx.where(_visible(a, b, kb), scores, -mx.inf)
        if lse is None:
            m = scores.max(axis=-1, keepdims=True)
            e = fast_exp_fwd(scores - m)
            total = e.sum(axis=-1, keepdims=True)
            return e * (1.0 / total), m + mx.log(total)
        return fast_exp_fwd(scores - lse[..., a:b, :]), None

    @mx.custom_function
    def attention(q, k, v):
        outs, lses = [], []
        for a, b, kb in blocks:
            p, lse = probs(q, k, a, b, kb, after=outs[-1] if outs else None)
            outs.append(p @ v[..., :kb, :])
            lses.append(lse)
        return mx.concatenate(outs, axis=-2), mx.concatenate(lses, axis=-2)

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        q, k, v = primals
        d_out, (out, lse) = cotangents[0], outputs
        delta = (d_out * out).sum(axis=-1, keepdims=True)  # rowsum(dP * P) = rowsum(dO * O)
        dq, dk, dv = [], 0.0, 0.0
        for a, b, kb in blocks:
            p, _ = probs(q, k, a, b, kb, lse, after=dq[-1] if dq else None)
            g = d_out[..., a:b, :]
            ds = p * (g @ v[..., :kb, :].swapaxes(-1, -2) - delta[..., a:b, :])
            dq.append(ds @ k[..., :kb, :])
            # grouped heads: sum the group's contributions into the shared K/V
            dk = dk + _pad_keys(
                (ds.swapaxes(-1, -2) @ q[..., a:b, :]).sum(2, keepdims=True), k.shape[-2]
            )
            dv = dv + _pad_keys((p.swapaxes(-1, -2) @ g).sum(2, keepdims=True), k.shape[-2])
        return mx.concatenate(dq, axis=-2), dk, dv

    q = (queries * scale).reshape(B, Hkv, H // Hkv, T, D)
    k = _pad_keys(mx.expand_dims(keys, 2), blocks[-1][2])
    v = _pad_keys(mx.expand_dims(values, 2), blocks[-1][2])
    out, _ = attention(q, k, v)
    return out.reshape(B, H, T, -1)


def lean_token_logps_fast(
    hidden, head, targets, *, vocab_chunk: int = 8192, token_chunk: int = 256, fast: bool = True
):
    """`mlx_dpo.logps.lean_token_logps` with the tile logsumexp and the VJP's softmax tiles
    taken from the fused exp (same algorithm, same order). The VJP returns no weight gradient:
    in mlx_dpo the lean head is always frozen (LMHead.from_model refuses a LoRA-wrapped head).
    The fused exp allocates ~2 more tile-sized buffers per tile (`view` splits the kernel), so
    the vocabulary tile is a quarter of the original's: about half its peak, as fast (measured
    head-only: 65 vs 107 MB and 342 vs 575 ms at 512 tokens x 32k). `fast=False` gives the
    original exps (for A/B runs)."""
    vocab_chunk = min(vocab_chunk, 2048) if fast else vocab_chunk
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
def use_fast_ops(model, *, attention=True, mlp=True, logps=True, flash=False):
    """Swap the fast ops into the model's module (attention, SwiGLU) and into mlx_dpo.logps
    for the duration; whatever is traced or compiled inside keeps them."""
    import mlx_dpo.logps as logps_mod

    module = sys.modules[type(model).__module__]
    patches = []
    if attention and hasattr(module, "scaled_dot_product_attention"):
        patches.append((module, "scaled_dot_product_attention", flash_sdpa if flash else fast_sdpa))
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
