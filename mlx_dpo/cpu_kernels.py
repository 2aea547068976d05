"""Exp-bound ops for MLX's x86 CPU build, written as arithmetic its JIT fuses.

The x86 `mlx[cpu]` wheel has no SIMD and no FMA, so `mx.exp` (and sigmoid, softmax, logsumexp,
SiLU) runs at ~100 M elements/s: most of a DPO step once the BLAS is fast. exp written as
2^n * 2^f (round to nearest, a degree-6 polynomial, the exponent bits) is plain mul/add/convert,
which `mx.compile` fuses into one loop: ~5x faster, within 1e-6 of float64 for |x| < 10 and as
close as mx.exp near the float32 range's ends (both ~4e-6: x * log2(e) rounds). SwiGLU and
attention have exact VJPs (the head's tiles sit inside logps' own). Measured by
benchmarks/bench.py (`mlx_dpo` vs `mx.exp`).

`enabled(plat)` says whether they may be used (the x86 CPU platform, see mlx_dpo.platform, not
opted out with MLX_DPO_NO_FAST_EXP=1); `install(model, plat)` puts dispatchers for attention
and SwiGLU in the model family's mlx-lm module (for every model of that family in the
process), and logps asks `head_options` for its vocabulary tiles. Each dispatcher runs, per
shape class, whichever of the kernel and MLX's own op mlx_dpo.kernel_choice measured faster:
on small shapes (short rows, head dim 32, a small vocabulary) per-op dispatch of the blocked
kernels can outweigh the exp they save.
"""

from __future__ import annotations

import os
import sys
import weakref
from functools import partial

import mlx.core as mx

from mlx_dpo import kernel_choice, lora_kernel, shared_prompt
from mlx_dpo.platform import Platform, detect

OPT_OUT_ENV = "MLX_DPO_NO_FAST_EXP"
# Causal attention goes in query blocks of this many positions, at fixed boundaries, so a row's
# sums run over the same keys however far its batch is padded (with the netlib BLAS the result is
# bitwise the same; OpenBLAS's round-off still depends slightly on the block's row count).
ATTENTION_BLOCK = 64
# The flash attention candidates kernel_choice times, by query block. Which is fastest depends
# on the shape (one layer's forward + backward, 1 BLAS thread): at 2 rows x 128 tokens 64
# (4.0 ms; 16: 5.5), at 2 x 1,024 x 9 heads 32 (177 ms; 64: 196), at 16 x 512 x 14 heads 16
# (645 ms; 64: 810): smaller blocks mask less of the diagonal and keep each block's scores in
# cache, larger ones run fewer ops. 128 was slower than 64 everywhere measured.
FLASH_BLOCKS = {"flash": ATTENTION_BLOCK, "flash-32": 32, "flash-16": 16}
LOG2E = 1.4426950408889634
ROUND = 12582912.0  # 1.5 * 2**23: (t + ROUND) - ROUND rounds t to an integer, no floorf call
# Taylor coefficients of 2^f = exp(f ln 2) for f in [-0.5, 0.5]; degree 6: rel. error < 3e-7.
_C = (
    1.0,
    0.6931471805599453,
    0.2402265069591007,
    0.05550410866482158,
    0.009618129107628477,
    0.0013333558146428443,
    0.00015403530393381606,
)


def opted_out() -> bool:
    return os.environ.get(OPT_OUT_ENV, "") not in ("", "0")


def enabled(plat: Platform | None = None) -> bool:
    """Only MLX's x86 CPU build lacks a vectorised exp; arm CPUs, Metal and CUDA have one."""
    return (plat or detect()).kind == "x86-cpu" and not opted_out()


def describe(plat: Platform | None = None) -> str:
    """One line for `mlx_dpo doctor`."""
    plat = plat or detect()
    if plat.kind != "x86-cpu":
        return f"off: not the x86 CPU build ({plat.kind}: MLX's own kernels)"
    if opted_out():
        return f"off ({OPT_OUT_ENV} is set): mx.exp and mlx-lm's attention"
    from mlx_dpo.config import ConfigError

    try:
        choices = kernel_choice.summary()
    except ConfigError as e:  # the doctor reports a bad MLX_DPO_KERNELS instead of failing
        choices = f"ERROR {e}"
    return (
        f"fused-arithmetic exp, flash attention, fused SwiGLU, each used where it measured "
        f"faster than MLX's own ({OPT_OUT_ENV}=1 to disable): {choices}"
    )


def _exp(x: mx.array) -> mx.array:
    # The floor -127 makes 2^n's exponent bits zero, so exp(x) for x below ~-88 (a masked
    # score's -inf) is exactly 0.0, as mx.exp gives. A floor of -126 gave 2^-126; a softmax's
    # division turns that into subnormal floats, which x86 GEMMs take on a slow path:
    # every causal diagonal block paid for it (a layer's flash attention, 4 x 1,024 tokens:
    # 662 ms forward + backward, 500 ms with the zeros).
    t = mx.clip(x * LOG2E, -127.0, 127.0)
    # mx.compile fuses element-wise ops into one loop only where every consumer of an
    # intermediate is in that loop and the chain is at most 11 ops deep. 2^n's bits pass a
    # `view`, which it cannot fuse, so a rounded n shared by both halves (as in
    # `n = round(t); f = t - n`) was written out and read back, and Horner's 12-deep
    # polynomial split again: 5 loops over the data. Rounding t twice, as two different graph
    # nodes (t - (-R) is t + R exactly), and Estrin's 5-deep polynomial leave 3: t (with
    # whatever x was computed from), the bits, and the polynomial times 2^n. 2.8 -> 1.7 ns a
    # float on the Xeon (benchmarks/RESULTS.md, section 1j).
    f = t - ((t + ROUND) - ROUND)
    n = (t - (-ROUND)) - ROUND
    f2 = f * f
    low = (_C[0] + _C[1] * f) + f2 * (_C[2] + _C[3] * f)
    p = low + (f2 * f2) * ((_C[4] + _C[5] * f) + _C[6] * f2)
    # 2^n from the exponent bits (a `where` for the zeros would keep x alive past the fused
    # kernel)
    return p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)


exp = mx.compile(_exp)  # not shapeless: `view` cannot infer shapes


def logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis. No VJP of its own: for use inside a custom VJP."""
    m = x.max(axis=-1, keepdims=True)
    return (mx.log(exp(x - m).sum(axis=-1, keepdims=True)) + m)[..., 0]


def _sigmoid(x):
    return 1.0 / (1.0 + _exp(-x))


@mx.compile
def _swiglu_fwd(gate, x):
    # one division at the end: exp(-gate) stays shallow enough in the fused loop (cpu_kernels._exp)
    return (gate * x) / (1.0 + _exp(-gate))


@mx.compile
def _swiglu_bwd(gate, x, g):
    s = _sigmoid(gate)
    silu = gate * s
    return g * x * (s + silu * (1.0 - s)), g * silu


@mx.custom_function
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's `swiglu`."""
    return _swiglu_fwd(gate, x)


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    return _swiglu_bwd(*primals, cotangent)


def _causal_blocks(T: int, n: int = ATTENTION_BLOCK) -> list[tuple[int, int, int]]:
    """(first query, end of queries, end of keys) per block of `n` queries. Keys run to the
    block's full end (K/V padded up to a multiple of n): a row meets the same keys whatever T."""
    return [(a, min(a + n, T), a + n) for a in range(0, T, n)]


def _pad_keys(x: mx.array, to: int) -> mx.array:
    extra = to - x.shape[-2]
    return x if extra == 0 else mx.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])


def scaled_dot_product_attention(
    queries, keys, values, cache, scale: float, mask, sinks=None, block: int = ATTENTION_BLOCK
):
    """mlx-lm's `scaled_dot_product_attention` for training: causal self-attention with the
    exp above and FlashAttention's algorithm in MLX ops, `block` queries at a time. The
    backward keeps only q, k, v, the output and one logsumexp per query and recomputes each
    query block's probabilities, so attention memory grows linearly with T (not rows x heads
    x T^2 per block), and each query block meets only the keys it can see (at T = 256, 10/16
    of the T x T work). Anything else (a KV cache, sinks, another mask) goes to mlx-lm's own."""
    from mlx_lm.models.base import scaled_dot_product_attention as original

    B, H, T, D = queries.shape
    causal = isinstance(mask, str) and mask == "causal"  # mask may also be an array
    if cache is not None or sinks is not None or not causal or T != keys.shape[2]:
        return original(queries, keys, values, cache, scale, mask, sinks)
    blocks = _causal_blocks(T, block)

    @mx.custom_function
    def attention(q, k, v):
        return _flash_forward(blocks, q, k, v)

    @attention.vjp
    def attention_vjp(primals, cotangents, outputs):
        return _flash_backward(blocks, primals, cotangents, outputs)

    Hkv, end = keys.shape[1], blocks[-1][2]
    q = (queries * scale).reshape(B, Hkv, H // Hkv, T, D).astype(mx.float32)
    k = _pad_keys(keys, end).astype(mx.float32)
    v = _pad_keys(values, end).astype(mx.float32)
    out, _ = attention(q, k, v)
    return out.reshape(B, H, T, -1).astype(values.dtype)


def _fold(x: mx.array, a: int, b: int) -> mx.array:
    """Positions a..b of (B, Hkv, group, T, D) as (B, Hkv, group * (b - a), D): the queries of a
    K/V head's group as the rows of one matmul against its keys (grouped-query attention
    without repeating K and V, and one GEMM per K/V head instead of one per query head)."""
    B, Hkv, group, _, D = x.shape
    return x[..., a:b, :].reshape(B, Hkv, group * (b - a), D)


def _block_scores(qa, k, a, b, kb):
    """Causal scores of a query block (`_fold`ed, positions a..b) against keys 0..kb,
    (B, Hkv, group, b - a, kb), the keys it cannot see at -inf."""
    B, Hkv, rows, _ = qa.shape
    scores = qa @ k[..., :kb, :].swapaxes(-1, -2)
    scores = scores.reshape(B, Hkv, rows // (b - a), b - a, kb)  # free: the group's rows
    visible = mx.arange(a, b)[:, None] >= mx.arange(kb)[None]
    return mx.where(visible, scores, -mx.inf)


def _flash_forward(blocks, q, k, v):
    """(attention output, logsumexp per query), one query block at a time; q is
    (B, Hkv, group, T, D), k and v (B, Hkv, T padded, D)."""
    outs, lses = [], []
    for a, b, kb in blocks:
        qa = _fold(q, a, b)
        # chained to the previous block: else MLX runs every block's matmul first and holds
        # all their scores at once (T^2 again)
        if outs:
            qa = mx.depends(qa, outs[-1])
        scores = _block_scores(qa, k, a, b, kb)
        m = scores.max(axis=-1, keepdims=True)
        e = exp(scores - m)
        total = e.sum(axis=-1, keepdims=True)
        out = (e.reshape(qa.shape[:-1] + (kb,)) @ v[..., :kb, :]).reshape(e.shape[:-1] + (-1,))
        # normalised after the matmul: D values a row instead of kb probabilities (one pass
        # over the score block less; 5-8% of the layer's attention at 512-1,024 tokens)
        outs.append(out * (1.0 / total))
        lses.append(m + mx.log(total))
    return mx.concatenate(outs, axis=-2), mx.concatenate(lses, axis=-2)


def _flash_backward(blocks, primals, cotangents, outputs):
    """(dq, dk, dv), each query block's probabilities recomputed from the saved logsumexp.
    The blocks go last to first, so each one's dk and dv (keys 0..kb) add onto the prefix of
    the running sums whose length it shares, and the keys past kb are final: no block pads
    its contribution to the full length (at 1,024 tokens that padding and adding of full
    T x D arrays per block was ~12% of the layer's attention)."""
    q, k, v = primals
    d_out, (out, lse) = cotangents[0], outputs
    delta = (d_out * out).sum(axis=-1, keepdims=True)  # rowsum(dP * P) = rowsum(dO * O)
    dq, dk, dv, final_k, final_v = [], None, None, [], []
    for a, b, kb in reversed(blocks):
        # after the previous block's dq, dk and dv: they consume its p and ds, which are then
        # freed (without dk and dv in the chain every block's p stays alive: T^2)
        qa = _fold(q, a, b)
        if dq:
            qa = mx.depends(qa, [dq[-1], dk, dv])
        p = exp(_block_scores(qa, k, a, b, kb) - lse[..., a:b, :]).reshape(qa.shape[:-1] + (kb,))
        g = _fold(d_out, a, b)
        ds = p * (g @ v[..., :kb, :].swapaxes(-1, -2) - _fold(delta, a, b))
        dq.append((ds @ k[..., :kb, :]).reshape(*q.shape[:3], b - a, -1))
        # the folded rows hold the whole group: these matmuls sum its contributions to K/V
        dk_b, dv_b = ds.swapaxes(-1, -2) @ qa, p.swapaxes(-1, -2) @ g
        if dk is not None:
            final_k.append(dk[..., kb:, :])
            final_v.append(dv[..., kb:, :])
            dk_b, dv_b = dk_b + dk[..., :kb, :], dv_b + dv[..., :kb, :]
        dk, dv = dk_b, dv_b
    dk = mx.concatenate([dk, *final_k[::-1]], axis=-2)
    dv = mx.concatenate([dv, *final_v[::-1]], axis=-2)
    return mx.concatenate(dq[::-1], axis=-2), dk, dv


def auto_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's `swiglu` or the fused one above, whichever kernel_choice measured faster for
    these shapes (decided when first traced: under mx.compile, once per shape)."""
    width = gate.shape[-1]
    if swiglu_choice(max(1, gate.size // width), width, gate.dtype) == "fused":
        return swiglu(gate, x)
    return _mlx_swiglu(gate, x)


def swiglu_choice(
    n_tokens: int, width: int, dtype=mx.float32, ranks: dict[str, int] | None = None
) -> str:
    """The SwiGLU for `n_tokens` x `width` (the MLP's intermediate size). Where the model is
    known (`install`) the candidates are timed inside its MLP block: the gate/up and down
    projections around them, with the LoRA adapters the model's last block has there. Timed
    alone the fused kernel wins 3-4x, but it is a boundary the step's compilation cannot fuse
    across: MLX's silu(gate) * x fuses with the adapters' additions, and at 2,048 x 1,408
    (a 40M model, 1,024 tokens) the fused kernel's 12-15% lead in the bare block was 4-8% with
    rank-8 adapters on the three projections. `ranks` (projection -> LoRA rank) stands for
    the adapters a run will insert (the memory planner decides before they are in)."""
    mlp = _mlp_of(width)
    if mlp:
        hidden, ranks = mlp[0], mlp[1] if ranks is None else ranks
        shape = kernel_choice.shape_class(
            "swiglu", N=n_tokens, I=width, H=hidden, R=ranks.get("gate_proj", 0)
        )
        bench = partial(_mlp_bench, n_tokens, hidden, width, dtype, ranks)
    else:
        shape = kernel_choice.shape_class("swiglu", N=n_tokens, I=width)
        bench = partial(_swiglu_bench, (n_tokens, width), dtype)
    return kernel_choice.chooser().choose("swiglu", shape, bench)


def _mlp_of(width: int) -> tuple[int, dict[str, int]] | None:
    """(hidden size, LoRA ranks) of the MLP `width` wide of the models installed, or None if
    none was. The ranks are those of the first live model with adapters in its MLP ({} if
    none): a separate reference model of the same shape, loaded (and freed) after the
    policy, has none, and the policy's step must find the decision its plan took."""
    entry = _MLP_MODELS.get(width)
    if entry is None:
        return None
    hidden, models = entry
    models[:] = [ref for ref in models if ref() is not None]  # drop the freed ones
    live = [m for m in (ref() for ref in models) if m is not None]
    return hidden, next((r for m in live if (r := mlp_lora_ranks(m))), {})


MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def last_mlp(model):
    """The MLP module of the model's last block (None if it has no such thing)."""
    layers = getattr(model, "layers", None) or []
    return getattr(layers[-1], "mlp", None) if len(layers) else None


def mlp_lora_ranks(model) -> dict[str, int]:
    """LoRA rank per MLP projection of the model's last block: {} before adapters are in."""
    mlp = last_mlp(model)
    ranks = {}
    for name in MLP_PROJECTIONS:
        lora_a = getattr(getattr(mlp, name, None), "lora_a", None)
        if lora_a is not None:
            ranks[name] = lora_a.shape[-1]
    return ranks


def auto_attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's attention or the flash one above, whichever kernel_choice measured faster for
    these shapes; what only mlx-lm's handles (a cache, sinks, other masks) goes there. Inside
    a shared-prompt forward (mlx_dpo.shared_prompt) it runs on each answer's own rows."""
    if shared_prompt.current() is not None:
        return shared_prompt.split_attention(_causal_attention, queries, keys, values, cache,
                                             scale, mask, sinks)  # fmt: skip
    return _causal_attention(queries, keys, values, cache, scale, mask, sinks)


def _causal_attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    from mlx_lm.models.base import scaled_dot_product_attention as original

    B, H, T, D = queries.shape
    causal = isinstance(mask, str) and mask == "causal"
    if cache is not None or sinks is not None or not causal or T != keys.shape[2]:
        return original(queries, keys, values, cache, scale, mask, sinks)
    block = FLASH_BLOCKS.get(attention_choice((B, H, keys.shape[1], T, D), queries.dtype))
    if block:
        return scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks, block)
    return original(queries, keys, values, cache, scale, mask, sinks)


def mlx_attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's attention (where the CPU kernels are off: on a GPU, or opted out); inside a
    shared-prompt forward on each answer's own rows."""
    from mlx_lm.models.base import scaled_dot_product_attention as original

    if shared_prompt.current() is not None:
        return shared_prompt.split_attention(original, queries, keys, values, cache, scale,
                                             mask, sinks)  # fmt: skip
    return original(queries, keys, values, cache, scale, mask, sinks)


def attention_choice(dims: tuple[int, int, int, int, int], dtype=mx.float32) -> str:
    """The causal self-attention kernel for (rows, heads, kv heads, length, head dim)."""
    B, H, Hkv, T, D = dims
    shape = kernel_choice.shape_class("attention", B=B, H=H, K=Hkv, T=T, D=D)
    bench = partial(_attention_bench, dims, D**-0.5, dtype)
    return kernel_choice.chooser().choose("attention", shape, bench)


def head_options(n_tokens: int, dim: int, vocab: int) -> dict:
    """lean_token_logps' exp options for the lean head's vocabulary tiles (n_tokens x dim
    hidden, a vocab-row head), as measured for this shape class."""
    from mlx_dpo import logps

    return logps.HEAD_OPTIONS[head_choice(n_tokens, dim, vocab)]


def head_choice(n_tokens: int, dim: int, vocab: int) -> str:
    shape = kernel_choice.shape_class("head", N=n_tokens, D=dim, V=vocab)
    bench = partial(_head_bench, n_tokens, dim, vocab)
    return kernel_choice.chooser().choose("head", shape, bench)


def step_choices(
    model,
    rows: int,
    T: int,
    C: int,
    mlp_ranks: dict[str, int] | None = None,
    block_rows: int | None = None,
    attention_T: int | None = None,
) -> dict[str, str]:
    """The kernels a training step of `rows` rows (`C` tokens scored per row) will run, its
    blocks `block_rows` (default `rows`) x `T` tokens and its attention `rows` x `attention_T`
    (default `T`; the shared-prompt layout's attention runs each answer's own rows), decided
    now (timed if no cached decision: what its first step would do), for the memory planner;
    {} where they are not installed or the model's dimensions are not known. `mlp_ranks`: the
    LoRA ranks the run's adapters will give the MLP's projections (default: the model's as
    it is)."""
    from mlx_dpo.logps import LMHead

    args = getattr(model, "args", None)
    H = getattr(args, "num_attention_heads", None)
    hidden, inter = getattr(args, "hidden_size", None), getattr(args, "intermediate_size", None)
    if not installed(model) or not enabled() or not (H and hidden and inter):
        return {}
    Hkv = getattr(args, "num_key_value_heads", None) or H
    D = getattr(args, "head_dim", None) or hidden // H
    n = T - 1  # the step's inputs: tokens[:, :-1]
    block_rows = rows if block_rows is None else block_rows
    out = {"attention": attention_choice((rows, H, Hkv, (attention_T or T) - 1, D))}
    if swiglu_installed(model):
        out["swiglu"] = swiglu_choice(block_rows * n, inter, ranks=mlp_ranks)
    head = LMHead.from_model(model)
    if head is not None:
        out["head"] = head_choice(rows * C, hidden, head.vocab_size)
    return out


def _mlx_swiglu(gate, x):
    from mlx_lm.models.activations import swiglu as original

    return original(gate, x)


def _normal(shape, seed: int) -> mx.array:
    # an explicit key: the global random state is an input of the compiled training step, and
    # an array drawn from it while that step is traced could not be evaluated here
    return mx.random.normal(shape, key=mx.random.key(seed))


def _grad_timer(fn, *arrays):
    """A blocking callable: compiled forward + backward of sum(fn(...) * a random cotangent),
    the sum evaluated too, as a step evaluates its loss: a gradient alone lets MLX skip the
    forward ops no gradient needs (a frozen projection's x W^T: all of it; MLX attention's
    P V, where the flash kernel's backward reads its output), which the step still runs."""
    out = fn(*arrays)
    ct = _normal(out.shape, 9).astype(out.dtype)

    def loss(*a):
        return (fn(*a) * ct).sum()

    step = mx.compile(mx.value_and_grad(loss, argnums=tuple(range(len(arrays)))))
    mx.eval(ct, *arrays)
    return lambda: mx.eval(step(*arrays))


def _swiglu_bench(shape, dtype) -> dict:
    gate, x = (_normal(shape, i).astype(dtype) for i in range(2))
    return {"mlx": _grad_timer(_mlx_swiglu, gate, x), "fused": _grad_timer(swiglu, gate, x)}


def _mlp_bench(n: int, hidden: int, width: int, dtype, ranks: dict | None = None) -> dict:
    """Each SwiGLU inside its MLP block, forward + backward to the block's input (the frozen
    base's projections: no weight gradients, as in the LoRA step), with LoRA adapters of
    `ranks` (projection -> rank)."""
    x, weights, adapters = _mlp_arrays(n, hidden, width, dtype, ranks or {})
    return {
        "mlx": _grad_timer(_mlp_block(weights, adapters, _mlx_swiglu), x),
        "fused": _grad_timer(_mlp_block(weights, adapters, swiglu), x),
    }


def _mlp_arrays(n: int, hidden: int, width: int, dtype, ranks: dict) -> tuple:
    """Random input (n x hidden), projection weights and (A, B) adapters for `_mlp_block`."""
    x = _normal((n, hidden), 0).astype(dtype)
    dims = {"gate_proj": (hidden, width), "up_proj": (hidden, width), "down_proj": (width, hidden)}
    weights, adapters = {}, {}
    for i, (name, (d_in, d_out)) in enumerate(dims.items()):
        weights[name] = _normal((d_out, d_in), 1 + i).astype(dtype) * 0.05
        if ranks.get(name):
            a = _normal((d_in, ranks[name]), 4 + i) * 0.05
            b = _normal((ranks[name], d_out), 7 + i) * 0.05
            adapters[name] = (a.astype(dtype), b.astype(dtype))
    mx.eval(x, weights, adapters)
    return x, weights, adapters


def _mlp_block(weights: dict, adapters: dict, act):
    """x -> down(act(gate(x), up(x))), each adapted projection computing x W^T + scale (x A) B
    (scale 20: mlx-lm's default) through the call the step takes for its shape
    (`lora_kernel.adapter`: the fused function or mlx-lm's LoRALinear)."""

    def linear(name, v):
        if name in adapters:
            w, (a, b) = weights[name], adapters[name]
            return lora_kernel.adapter(v, w, a)(v, w, a, b)
        return v @ weights[name].T

    return lambda x: linear("down_proj", act(linear("gate_proj", x), linear("up_proj", x)))


def _attention_bench(dims, scale, dtype) -> dict:
    from mlx_lm.models.base import scaled_dot_product_attention as original

    B, H, Hkv, T, D = dims
    q = _normal((B, H, T, D), 0).astype(dtype)
    k, v = (_normal((B, Hkv, T, D), i).astype(dtype) for i in (1, 2))
    flash = {
        name: partial(scaled_dot_product_attention, block=block)
        for name, block in FLASH_BLOCKS.items()
    }
    return {
        name: _grad_timer(lambda q, k, v, f=f: f(q, k, v, None, scale, "causal"), q, k, v)
        for name, f in {"mlx": original, **flash}.items()
    }


# The head is timed on a slice of at most this many tokens x vocabulary rows: its cost is
# linear in both and the slice runs the same tiles (Qwen's 152k vocabulary took > 1 min whole).
HEAD_BENCH_TOKENS, HEAD_BENCH_VOCAB = 1024, 32768


def head_candidates(n_tokens: int, vocab: int) -> list[str]:
    """The head's candidates for `n_tokens` scored tokens: "exp-kept" only where the kept
    logits of the largest shape of its class fit in logps.KEEP_LOGITS_MAX_BYTES."""
    from mlx_dpo import logps

    fits = 4 * kernel_choice.bucket(n_tokens) * vocab <= logps.KEEP_LOGITS_MAX_BYTES
    return [k for k, o in logps.HEAD_OPTIONS.items() if fits or not o.get("keep_logits")]


def _head_bench(n_tokens: int, dim: int, vocab: int) -> dict:
    """The head's candidates (`head_candidates`), timed on a slice of the shape."""
    from mlx_dpo import logps

    h, head, targets = _head_arrays(n_tokens, dim, vocab)
    return {
        name: _grad_timer(
            lambda h, o=logps.HEAD_OPTIONS[name]: logps.lean_token_logps(h, head, targets, **o), h
        )
        for name in head_candidates(n_tokens, vocab)
    }


def _head_arrays(n_tokens: int, dim: int, vocab: int) -> tuple:
    """Hidden states, head and targets of the head's timing slice, evaluated: the compiled
    timer captures the head and targets as constants, and unevaluated they would carry their
    random draws into every timed call (16M normals for a 32k x 512 head took more time than
    the head itself and hid the candidates' differences)."""
    from mlx_dpo import logps

    n_tokens, vocab = min(n_tokens, HEAD_BENCH_TOKENS), min(vocab, HEAD_BENCH_VOCAB)
    h = _normal((n_tokens, dim), 0) * 0.5
    head = logps.LMHead({"weight": _normal((vocab, dim), 1) * 0.02})
    targets = mx.random.randint(0, vocab, (n_tokens,), key=mx.random.key(2))
    mx.eval(h, head.arrays, targets)
    return h, head, targets


def installed(model) -> bool:
    """Whether `model` runs the measured kernel choice (its mlx-lm module has the dispatchers)."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "scaled_dot_product_attention", None) is auto_attention


def swiglu_installed(model) -> bool:
    """Whether `model`'s MLP runs the measured SwiGLU choice (its module's `swiglu` is ours)."""
    return getattr(sys.modules.get(type(model).__module__), "swiglu", None) is auto_swiglu


def install(model, plat: Platform | None = None, *, allowed: bool = True) -> list[str]:
    """Put the dispatchers (each kernel measured against MLX's own per shape class, see
    mlx_dpo.kernel_choice) in `model`'s mlx-lm module, or mlx-lm's own functions when disabled
    on `plat` or not `allowed` (the compute path is not float32) (module globals: this holds
    for every model of that family in the process). Returns a note for the user."""
    module = sys.modules.get(type(model).__module__)
    use = allowed and enabled(plat)
    if use:
        kernel_choice.chooser()  # a malformed MLX_DPO_KERNELS fails here, at load (ConfigError)
        args = getattr(model, "args", None)
        inter, hidden = (getattr(args, k, None) for k in ("intermediate_size", "hidden_size"))
        if isinstance(inter, int) and isinstance(hidden, int):
            if _MLP_MODELS.get(inter, (hidden,))[0] != hidden:
                del _MLP_MODELS[inter]  # another architecture with this MLP width: the last wins
            _MLP_MODELS.setdefault(inter, (hidden, []))[1].append(weakref.ref(model))
    lora_kernel.use(use)
    swapped = []
    kernels = (("scaled_dot_product_attention", auto_attention, mlx_attention),)
    kernels += (("swiglu", auto_swiglu, None),)
    for name, fast, plain in kernels:
        if module is None or not hasattr(module, name):
            continue
        current = getattr(module, name)
        original = _ORIGINALS.setdefault((module.__name__, name), current)
        # without the kernels, attention still goes through mlx_attention: it runs the
        # shared-prompt layout on every platform
        setattr(module, name, fast if use else plain or original)
        swapped += [name] if use else []
    if not swapped:
        return []
    return [
        f"CPU kernels for {', '.join(swapped)}, the LoRA adapters and the head's tiles chosen "
        f"by timing each against MLX's own on the first step's shapes "
        f"({kernel_choice.ENV}=KERNEL=on|off, "
        f"{OPT_OUT_ENV}=1 for MLX's own everywhere)"
    ]


# (module, name) -> mlx-lm's function, kept so that opting out restores it
_ORIGINALS: dict[tuple[str, str], object] = {}
# MLP intermediate size -> (hidden size, the models installed with it), for swiglu_choice:
# their adapters are inserted after `install`, and looked up when the SwiGLU is first timed
_MLP_MODELS: dict[int, tuple[int, list[weakref.ref]]] = {}
