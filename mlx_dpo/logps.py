"""Per-sequence log-probabilities of completions: the input of every DPO loss.

sequence_logps(logits, labels, average=False) -> (B,) float32
    The paper code's ``_get_batch_logps``: logit t scores label t+1, labels are -100 where a token
    does not count; sum (or mean over counted tokens, 0 for a row with none) in float32.
LMHead.from_model(model) -> LMHead | None
    The model's output projection as fp32 weight rows (dequantized on the fly), or None when the
    head is not a plain/quantized linear or tied embedding, or the model post-processes logits.
lean_token_logps(hidden, head, targets) -> (N,) float32
    log p(target | hidden) in token x vocab tiles with an online logsumexp and a custom VJP, so
    the N x V logits never exist.
forward_pair_logps(model, batch, ld_alpha=None, with_weights=False) -> PairForward
    One forward over batch.tokens[:, :-1] (rows 0..B-1 chosen, B..2B-1 rejected; or, in the
    shared-prompt layout, B rows prompt | chosen | rejected: mlx_dpo.shared_prompt), scoring
    only completion positions; full logits when there is no LMHead or lean=False.
    Besides the summed log-probs: LD-DPO's sums (the first min(|yw|, |yl|) completion tokens of
    the pair plus ld_alpha times the rest) and WPO's detached sequence weights
    exp(mean_t(log p_t - log Σ_v p_v²)), from a second online logsumexp (of 2·logits) in the
    same vocabulary tiles: no more memory than the lean head's.
forward_logps(model, batch, lean=True) -> (logps (2B,), counts (2B,))
    The plain summed log-probs and completion token counts (forward_pair_logps' first two).

Every log-prob is float32 whatever the model's dtype: hidden states (bf16 on a GPU path) are
cast to float32 before the head and each vocabulary tile's logsumexp accumulates in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlx_dpo import dequant, shared_prompt

IGNORE_INDEX = -100
# Model args that change logits after the head; the lean path cannot reproduce them.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logits_scaling", "logit_scale")
_LOGIT_POSTPROCESSING += ("dim_model_base",)  # MiniCPM scales the hidden state before its head


def _as_mx(x: Any, dtype: mx.Dtype | None = None) -> mx.array:
    x = x if isinstance(x, mx.array) else mx.array(x)
    return x if dtype is None else x.astype(dtype)


def sequence_logps(logits: Any, labels: Any, average: bool = False) -> mx.array:
    """Summed (or mean) log-probs of the labelled tokens of each row.

    Args:
        logits: (B, T, V) pre-softmax scores; logit t scores label t+1.
        labels: (B, T) token ids, -100 where a token is not counted (prompt, padding).
        average: divide by the number of counted tokens (a row with none gives 0, not NaN).

    Returns:
        (B,) float32.
    """
    logits, labels = _as_mx(logits), _as_mx(labels, mx.int32)
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            "logits (B, T, V) and labels (B, T) must agree on (B, T); got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if labels.shape[1] < 2:  # no token has a predecessor to score it
        return mx.zeros(labels.shape[:1], dtype=mx.float32)
    # The shift: logit t predicts token t+1, so drop the last logit and the first label.
    logits = logits[:, :-1].astype(mx.float32)
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    # -100 is no valid index: gather id 0 there; the mask discards it (id 0 stays a real label).
    picked = mx.take_along_axis(logits, mx.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    token_logps = mx.where(mask, picked - mx.logsumexp(logits, axis=-1), 0.0)
    total = token_logps.sum(-1)
    if not average:
        return total
    return total / mx.maximum(mask.sum(-1), 1).astype(mx.float32)


@dataclass(frozen=True)
class LMHead:
    """An mlx-lm output projection read as fp32 rows of its (vocab_size, D) weight.

    ``arrays`` holds ``weight`` (+ ``scales``, ``biases`` when quantized); ``group_size``,
    ``bits``, ``mode`` are the quantization settings (None: a float weight).
    """

    arrays: dict[str, mx.array]
    group_size: int | None = None
    bits: int | None = None
    mode: str = "affine"

    @property
    def vocab_size(self) -> int:
        return self.arrays["weight"].shape[0]

    @property
    def quantized(self) -> bool:
        return self.group_size is not None

    @classmethod
    def from_model(cls, model: nn.Module) -> LMHead | None:
        """The head of an mlx-lm model, or None when only the plain path computes its logits
        (a LoRA-wrapped or biased head, soft-capped or scaled logits, no ``model.model``)."""
        backbone, args = getattr(model, "model", None), getattr(model, "args", None)
        postprocessed = [k for k in _LOGIT_POSTPROCESSING if getattr(args, k, None) is not None]
        if backbone is None or postprocessed:
            return None
        tied = getattr(args, "tie_word_embeddings", False) or not hasattr(model, "lm_head")
        head = getattr(backbone, "embed_tokens", None) if tied else model.lm_head
        # isinstance admits subclasses; a LoRA wrapper is another module type and is refused.
        if isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and "bias" not in head:
            arrays = {k: head[k] for k in ("weight", "scales", "biases") if head.get(k) is not None}
            return cls(arrays, head.group_size, head.bits, head.mode)
        if isinstance(head, (nn.Linear, nn.Embedding)) and "bias" not in head:
            return cls({"weight": head.weight})
        return None

    def rows(self, index: slice | mx.array) -> mx.array:
        """fp32 weight rows at ``index`` (a vocab slice or (N,) ids) -> (n, D)."""
        a = self.arrays
        if not self.quantized:
            return a["weight"][index].astype(mx.float32)
        return dequant.rows(a, index, self.group_size, self.bits, self.mode)


# The lean head's default tiles: token_chunk x vocab_chunk fp32 logits (8 MB).
VOCAB_CHUNK, TOKEN_CHUNK = 8192, 256


def _tiles(n: int, size: int) -> list[slice]:
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def _after(x: mx.array, previous: mx.array | None) -> mx.array:
    # Without this edge MLX may run every tile's matmul before the reductions, keeping the whole
    # N x V alive; with it, tiles run in order and peak ~ the ~10 tasks MLX keeps in flight.
    return x if previous is None else mx.depends(x, previous)


def lean_token_logps(
    hidden: mx.array,
    head: LMHead,
    targets: mx.array,
    *,
    vocab_chunk: int = VOCAB_CHUNK,
    token_chunk: int = TOKEN_CHUNK,
    with_sum_sq: bool = False,
    fast_exp: bool | None = None,
    exp_tile: int = 2048,
    keep_logits: bool = False,
) -> mx.array | tuple[mx.array, mx.array]:
    """log p(target | hidden) through ``head`` without materialising the N x V logits.

    Args:
        hidden: (N, D) final-normed hidden states (any float dtype; computed in fp32).
        head: the LM head (``LMHead.from_model``).
        targets: (N,) int token ids.
        vocab_chunk, token_chunk: tile sizes. Peak memory is about a dozen fp32 tiles of
            token_chunk x vocab_chunk (8 MB each by default) on the CPU, whatever N and V.
        with_sum_sq: also return log Σ_v p_v² per token (WPO), no gradient: a second online
            logsumexp, of 2·logits, over the same tiles.
        fast_exp: use mlx_dpo.cpu_kernels' exp (default: when enabled on this platform).
        exp_tile: with the fast exp, vocab tiles at most this wide (its fused kernel holds ~2
            more tiles in flight); HEAD_OPTIONS are the measured choices' settings.
        keep_logits: keep the forward's logit tiles (N x V fp32 in all) for the backward
            instead of recomputing them there: one of the head's three N x D x V matmuls
            less, for N x V x 4 bytes held from the head's forward to its backward.

    Returns:
        (N,) float32, or ((N,), (N,)) with ``with_sum_sq``. Differentiable w.r.t. ``hidden``
        (and a float head's weight; a quantized head gets zero gradients) by a VJP that
        recomputes the softmax tile by tile (from the kept logits with ``keep_logits``).
        Works under ``mx.compile`` and ``nn.value_and_grad``.
    """
    if hidden.ndim != 2 or tuple(targets.shape) != tuple(hidden.shape[:1]):
        raise ValueError(
            f"hidden must be (N, D) and targets (N,); got {tuple(hidden.shape)} "
            f"and {tuple(targets.shape)}"
        )
    from mlx_dpo import cpu_kernels

    exp, logsumexp = mx.exp, partial(mx.logsumexp, axis=-1)
    if cpu_kernels.enabled() if fast_exp is None else fast_exp:  # ~6x faster exp on x86 CPUs
        exp, logsumexp = cpu_kernels.exp, cpu_kernels.logsumexp
        vocab_chunk = min(vocab_chunk, exp_tile)
    tiles = (_tiles(hidden.shape[0], token_chunk), _tiles(head.vocab_size, vocab_chunk))
    forward = partial(_tiled_logps, head, tiles, logsumexp, with_sum_sq, keep_logits)

    # Outputs: (log p, log Σ p² or nothing, the kept logit tiles or nothing); the VJP reads
    # the kept tiles from the outputs, so they live until the head's backward has run.
    @mx.custom_function
    def token_logps(hidden: mx.array, targets: mx.array, arrays: dict):
        return forward(hidden, targets, arrays)

    @token_logps.vjp
    def token_logps_vjp(primals: tuple, cotangents, outputs) -> tuple:
        # log Σ p² is a detached weight: only log p's cotangent counts
        kept = outputs[2] if keep_logits else None
        return _tiled_logps_vjp(head, tiles, exp, primals, cotangents[0], outputs[0], kept)

    out = token_logps(hidden, targets.astype(mx.int32), head.arrays)
    return (out[0], mx.stop_gradient(out[1][0])) if with_sum_sq else out[0]


def _tiled_logps(head: LMHead, tiles, logsumexp, with_sum_sq, keep, h, targets, arrays):
    """lean_token_logps' forward: (log p(target) (N,), [log Σ_v p_v² (N,)] or [], the logit
    tiles in token-tile-major order if `keep` else []), by an online logsumexp over the
    vocabulary tiles of each token tile."""
    token_tiles, vocab_tiles = tiles
    w, h = replace(head, arrays=arrays), h.astype(mx.float32)
    lse, lse2, lse_rows, lse2_rows, kept = None, None, [], [], []
    for t in token_tiles:
        for v in vocab_tiles:
            # Online logsumexp: fold each tile's logsumexp into the running one.
            logits = _after(h[t], lse) @ w.rows(v).T
            if keep:
                kept.append(logits)
            tile = logsumexp(logits)
            lse = tile if v.start == 0 else mx.logaddexp(lse, tile)
            if with_sum_sq:
                tile2 = logsumexp(2.0 * logits)
                lse2 = tile2 if v.start == 0 else mx.logaddexp(lse2, tile2)
        lse_rows.append(lse)
        lse2_rows.append(lse2)
    lse = mx.concatenate(lse_rows)
    # The target logit is one dot product per token with its weight row.
    logp = (h * w.rows(targets)).sum(-1) - lse
    # log Σ p² = logsumexp(2 z) - 2 logsumexp(z)
    sum_sq = [mx.concatenate(lse2_rows) - 2.0 * lse] if with_sum_sq else []
    return logp, sum_sq, kept


def _tiled_logps_vjp(head: LMHead, tiles, exp, primals: tuple, cotangent, output, kept) -> tuple:
    """The gradient of log p(target) w.r.t. (hidden, targets, the head's arrays), the softmax
    recomputed tile by tile: from the logits the forward `kept` (a list in its order), or from
    the hidden states again."""
    token_tiles, vocab_tiles = tiles
    hidden, targets, arrays = primals
    w, h, g = replace(head, arrays=arrays), hidden.astype(mx.float32), cotangent[:, None]
    w_target = w.rows(targets)
    # lse recovered from the output (logp = target_logit - lse): no second logsumexp pass.
    lse = (h * w_target).sum(-1) - output
    grad_h, grad_w, expected = [], [0.0] * len(vocab_tiles), None
    for i, t in enumerate(token_tiles):
        for k, v in enumerate(vocab_tiles):
            rows = w.rows(v)
            if kept is None:
                logits = _after(h[t], expected) @ rows.T
            else:  # in order too: a softmax tile per kept tile would otherwise be in flight
                logits = _after(kept[i * len(vocab_tiles) + k], expected)
            p = exp(logits - lse[t, None])  # a softmax tile
            # E_p[W row] = softmax @ W, summed over the vocab tiles.
            expected = p @ rows if v.start == 0 else expected + p @ rows
            # d logp / dW_v = (1[v = target] - p_v) h: the -p part. MLX is lazy, so this is
            # only computed when a float head is trained; a frozen head never asks for it.
            grad_w[k] = grad_w[k] - p.T @ (g[t] * h[t])
        grad_h.append(g[t] * (w_target[t] - expected))  # d logp / dh = W[target] - E_p[W]
    grads = {k: mx.zeros_like(a) for k, a in arrays.items()}
    if not w.quantized:  # a quantized head cannot be trained: its gradients stay zero
        dw = mx.concatenate(grad_w).at[targets].add(g * h)
        grads["weight"] = dw.astype(arrays["weight"].dtype)
    grad_hidden = mx.concatenate(grad_h).astype(hidden.dtype)
    return grad_hidden, mx.zeros_like(targets), grads


# The lean head's candidates for mlx_dpo.kernel_choice ("head"): which exp, how wide the
# tiles, whether the backward reuses the forward's logits.
HEAD_OPTIONS = {
    "mlx": {"fast_exp": False},
    "exp": {"fast_exp": True, "exp_tile": 2048},
    "exp-wide": {"fast_exp": True, "exp_tile": 8192},
    "exp-kept": {"fast_exp": True, "exp_tile": 2048, "keep_logits": True},
}
# "exp-kept" holds the scored tokens' N x V fp32 logits through the head's backward; it is a
# candidate only while those of its token class fit in this many bytes (Qwen's 152k
# vocabulary: classes up to 1,024 tokens).
KEEP_LOGITS_MAX_BYTES = 2**30
_FORWARD_ONLY = [0]  # depth of `forward_only` blocks


@contextmanager
def forward_only() -> Iterator[None]:
    """Log-prob heads built (traced) inside run without a backward (the reference and
    validation passes): a head choice that keeps its logits for the backward keeps nothing
    there, since the kept tiles would only hold N x V memory until the head's output is done."""
    _FORWARD_ONLY[0] += 1
    try:
        yield
    finally:
        _FORWARD_ONLY[0] -= 1


def _head_options(model, n_tokens: int, dim: int, vocab: int) -> dict:
    from mlx_dpo import cpu_kernels

    if not (cpu_kernels.installed(model) and cpu_kernels.enabled()):
        return HEAD_OPTIONS["mlx"]
    options = cpu_kernels.head_options(n_tokens, dim, vocab)
    return {**options, "keep_logits": False} if _FORWARD_ONLY[0] else options


class PairForward(NamedTuple):
    """What the log-prob head returns for a preference batch (rows 0..B-1 chosen, B..2B-1
    rejected); every field (2B,) float32."""

    logps: mx.array  # summed completion log-probs (LD-DPO's sums when ld_alpha is set)
    counts: mx.array  # completion tokens per row
    plain_logps: mx.array  # summed completion log-probs, never LD-weighted
    weights: mx.array | None  # WPO: exp(mean_t(log p_t - log Σ_v p_v²)), detached


def forward_pair_logps(
    model: nn.Module,
    batch: Any,
    *,
    lean: bool = True,
    vocab_chunk: int = VOCAB_CHUNK,
    token_chunk: int = TOKEN_CHUNK,
    ld_alpha: float | None = None,
    with_weights: bool = False,
) -> PairForward:
    """Summed completion log-probs of every row of a preference batch, in one forward.

    Args:
        model: an mlx-lm model (``model.model`` is the backbone returning final-normed hidden).
        batch: any object with ``tokens`` (2B, T) int, ``positions`` (2B, C) int (index t into
            tokens[:, :-1] whose next token is a completion token), ``targets`` (2B, C) int
            (= tokens[r, positions + 1]) and ``target_mask`` (2B, C) (1 on real completion tokens).
        lean: project only completion positions through the head in tiles (``lean_token_logps``);
            False, or a head ``LMHead`` cannot read, computes full logits first.
        ld_alpha: LD-DPO (Liu et al. 2024): ``logps`` sums the first ℓ = min(|yw|, |yl|)
            completion tokens of each pair plus ld_alpha times the tokens past ℓ.
        with_weights: also compute WPO's sequence weights (Zhou et al. 2024, Eq. 2).
    """
    inputs = _as_mx(batch.tokens)[:, :-1]
    positions, targets = _as_mx(batch.positions, mx.int32), _as_mx(batch.targets, mx.int32)
    target_mask = _as_mx(batch.target_mask, mx.float32)
    head = LMHead.from_model(model) if lean else None
    log_sum_sq = None
    if head is None:
        # Full logits, but the logsumexp only at completion positions: (2B, C, V) in fp32.
        logits = _at_positions(model, inputs, batch, positions).astype(mx.float32)
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        lse = mx.logsumexp(logits, axis=-1)
        token_logps = picked - lse
        if with_weights:
            log_sum_sq = mx.stop_gradient(mx.logsumexp(2.0 * logits, axis=-1) - 2.0 * lse)
    else:
        hidden = _at_positions(model.model, inputs, batch, positions)
        rows, width = positions.shape
        out = lean_token_logps(
            hidden.reshape(rows * width, -1), head, targets.reshape(-1),
            vocab_chunk=vocab_chunk, token_chunk=token_chunk, with_sum_sq=with_weights,
            **_head_options(model, rows * width, hidden.shape[-1], head.vocab_size),
        )  # fmt: skip
        flat, flat_sq = out if with_weights else (out, None)
        token_logps = flat.reshape(rows, width)
        if with_weights:
            log_sum_sq = flat_sq.reshape(rows, width)
    token_logps = mx.where(target_mask > 0, token_logps * target_mask, 0.0)
    counts = target_mask.sum(-1)
    plain = token_logps.sum(-1)
    logps = plain if ld_alpha is None else _ld_logps(token_logps, target_mask, counts, ld_alpha)
    weights = None
    if with_weights:
        adjusted = mx.where(target_mask > 0, token_logps - log_sum_sq * target_mask, 0.0)
        weights = mx.stop_gradient(mx.exp(adjusted.sum(-1) / mx.maximum(counts, 1.0)))
    return PairForward(logps, counts, plain, weights)


def _at_positions(net: nn.Module, inputs: mx.array, batch: Any, positions: mx.array):
    """net(inputs) (a backbone's hidden states, or a model's logits) at `positions` (2B, C):
    (2B, C, width). In the shared-prompt layout (mlx_dpo.shared_prompt) the B input rows hold
    both answers of their pair: output rows r and B + r both read row r."""
    merge = getattr(batch, "merge_index", None)
    if merge is None:
        return mx.take_along_axis(net(inputs), positions[..., None], axis=1)
    rope_positions = _as_mx(batch.rope_positions, mx.int32)[:, :-1]
    split = _as_mx(batch.split_index, mx.int32)
    with shared_prompt.layout(rope_positions, split, _as_mx(merge, mx.int32)):
        out = net(inputs)
    B, T = inputs.shape
    rows = mx.concatenate([mx.arange(B), mx.arange(B)])[:, None] * T + positions
    return out.reshape(B * T, -1)[rows]


def _ld_logps(token_logps, target_mask, counts, alpha: float) -> mx.array:
    """LD-DPO's sums: the first ℓ = min(|yw|, |yl|) completion tokens of each pair count fully,
    the longer answer's tokens past ℓ count alpha times (its length bias is damped)."""
    b = counts.shape[0] // 2
    shared = mx.minimum(counts[:b], counts[b:])
    shared = mx.concatenate([shared, shared])[:, None]
    position = mx.cumsum(target_mask, axis=1)  # 1 at the first completion token
    in_shared = (position <= shared).astype(mx.float32)
    return (token_logps * (in_shared + alpha * (1.0 - in_shared))).sum(-1)


def forward_logps(
    model: nn.Module,
    batch: Any,
    *,
    lean: bool = True,
    vocab_chunk: int = VOCAB_CHUNK,
    token_chunk: int = TOKEN_CHUNK,
    ld_alpha: float | None = None,
) -> tuple[mx.array, mx.array]:
    """(logps (2B,), counts (2B,)) float32 of ``forward_pair_logps`` (same arguments)."""
    out = forward_pair_logps(
        model, batch, lean=lean, vocab_chunk=vocab_chunk, token_chunk=token_chunk,
        ld_alpha=ld_alpha,
    )  # fmt: skip
    return out.logps, out.counts
