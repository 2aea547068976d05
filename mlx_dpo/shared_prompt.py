"""The prompt once per pair: one row `prompt | chosen | rejected` instead of two rows.

A pair's chosen and rejected sequences begin with the same prompt, and a causal model's hidden
states over the prompt do not depend on what follows it, so two rows compute the prompt twice.
In the shared layout (`data.collate(..., share_prompt=True)`) a pair is one row: the prompt,
then the chosen answer, then the rejected answer, then padding. Two things make every token's
hidden state what it is in its own `prompt + answer` row:

- positions: the rejected answer's positions restart where the prompt ends (`rope_positions`:
  prompt 0..P-1, chosen P..P+C-1, rejected P..P+R-1), applied by wrapping the model's RoPE
  modules (`install`); the rotation of each token is that of its position, as in two rows.
- visibility: a rejected token never sees a chosen one. Attention is the one place where
  tokens meet, so there the shared rows' queries, keys and values are gathered into each
  answer's own row `prompt + answer` (`split_index`, the two-row layout's rows), any causal
  kernel runs on those, and each token's output is read back from its own row
  (`merge_index`): `split_attention`, called by the attention dispatchers in `cpu_kernels`.
  Attention costs what it does in two rows; the projections and the MLP, which treat each
  token alone, run the prompt once.

The first rejected token is scored from the prompt's last hidden state, as the first chosen one
is (`data.collate` puts that position in both rows of `positions`). At the grid's pairs (an
answer as long as the prompt) that is a quarter fewer tokens through the blocks; the head
scores the same tokens either way.

`install(model)` wraps the RoPE modules and then runs `check`: a probe batch in both layouts
must give the same log-probs, else the model keeps two rows per pair (an architecture whose
positions or mask this cannot express: sliding windows, attention sinks, a RoPE whose
frequencies depend on the sequence length). `active(model)` says which layout its batches use.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np

_ACTIVE = "_mlx_dpo_shared_prompt"  # model attribute: the layout its batches use
_LAYOUT: list[tuple[mx.array, mx.array, mx.array]] = []  # (rope positions, split, merge)


class UnsupportedLayout(RuntimeError):
    """The model's attention met something the shared layout cannot express."""


@contextmanager
def layout(
    rope_positions: mx.array, split_index: mx.array, merge_index: mx.array
) -> Iterator[None]:
    """Inside, the model's RoPE and attention run the shared layout of its (B, T) input rows:
    each token's position, and the gathers between the shared rows and each answer's own
    (`data.collate`). Entered around the backbone's forward, and again by
    `model.enable_grad_checkpoint` where a block is recomputed in the backward."""
    _LAYOUT.append((rope_positions, split_index, merge_index))
    try:
        yield
    finally:
        _LAYOUT.pop()


def current() -> tuple[mx.array, mx.array, mx.array] | None:
    return _LAYOUT[-1] if _LAYOUT else None


def split_attention(attention, queries, keys, values, cache, scale: float, mask, sinks):
    """Causal `attention` (mlx-lm's signature) of the shared rows' (B, H, T, D) queries, keys
    and values, RoPE applied: run on the 2B rows `prompt + answer` gathered from them, each
    token's output read back from its own row. A rejected query meets no chosen key, and the
    kernel is any causal one (it is chosen for the two-row shapes it runs at)."""
    check_attention(queries, keys, cache, mask, sinks)
    _, split, merge = _LAYOUT[-1]
    q, k, v = (_gather(x, split) for x in (queries, keys, values))
    return _gather(attention(q, k, v, None, scale, "causal", None), merge)


def _gather(x: mx.array, index: mx.array) -> mx.array:
    """(B, H, T, D) -> (R, H, L, D): row r's place l holds x's token `index[r, l]` (flat over
    B x T). The backward adds each place's gradient into its token."""
    B, H, T, D = x.shape
    R, L = index.shape
    flat = x.swapaxes(1, 2).reshape(B * T, H, D)
    return flat[index.reshape(-1)].reshape(R, L, H, D).swapaxes(1, 2)


def check_attention(queries, keys, cache, mask, sinks) -> None:
    """What the shared layout's attention can run: causal self-attention over the whole row.
    Called on every shared-layout attention call (counted for `check`)."""
    _CALLS[0] += 1
    causal = isinstance(mask, str) and mask == "causal"
    T = _LAYOUT[-1][2].shape[1]
    if cache is not None or sinks is not None or not causal or keys.shape[2] != T:
        raise UnsupportedLayout("attention with a cache, sinks or its own mask")
    if queries.shape[2] != T:
        raise UnsupportedLayout(f"attention over {queries.shape[2]} of the row's {T} tokens")


_CALLS = [0]  # shared-layout attention calls, for `check`


class _PositionedRoPE:
    """Mixed into a RoPE module's class (`install`): inside `layout`, each token is rotated by
    its own position. mx.fast.rope takes one offset per leading row, so the (B, H, T, D) input
    is laid out as B*T rows of one position each."""

    def __call__(self, x, offset=0, *args, **kwargs):
        shared = current()
        if shared is None:
            return super().__call__(x, offset, *args, **kwargs)
        positions = shared[0]
        if x.ndim != 4 or x.shape[2] != positions.shape[1] or not _is_zero(offset):
            raise UnsupportedLayout(f"RoPE over {x.shape} with offset {offset}")
        B, H, T, D = x.shape
        rows = x.swapaxes(1, 2).reshape(B * T, H, 1, D)
        out = super().__call__(rows, positions.reshape(-1), *args, **kwargs)
        return out.reshape(B, T, H, D).swapaxes(1, 2)


def _is_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


_WRAPPED: dict[type, type] = {}


def _wrap_rope(module: nn.Module) -> None:
    base = type(module)
    if issubclass(base, _PositionedRoPE):
        return
    if base not in _WRAPPED:
        _WRAPPED[base] = type(base.__name__, (_PositionedRoPE, base), {})
    module.__class__ = _WRAPPED[base]


def _rope_modules(model: nn.Module) -> list[nn.Module]:
    """The RoPE module of each attention layer: a child named `rope` (mlx-lm's convention)."""
    return [
        m.rope for _, m in model.named_modules() if isinstance(getattr(m, "rope", None), nn.Module)
    ]


def active(model) -> bool:
    return bool(getattr(model, _ACTIVE, False))


def install(model: nn.Module, wanted: bool = True) -> list[str]:
    """Give `model` the shared layout if `wanted` and `check` passes; returns a note for the user.
    Needs `cpu_kernels.install` done first (its dispatchers run the layout's attention)."""
    from mlx_dpo import cpu_kernels

    object.__setattr__(model, _ACTIVE, False)
    if not wanted:
        return []
    two_rows = "two rows per pair (the prompt computed twice)"
    ropes = _rope_modules(model)
    module = sys.modules.get(type(model).__module__)
    ours = (cpu_kernels.auto_attention, cpu_kernels.mlx_attention)
    if getattr(module, "scaled_dot_product_attention", None) not in ours:
        return [f"{two_rows}: this model's attention does not go through mlx_dpo's dispatcher"]
    if not ropes or _windowed(model, module):
        return [f"{two_rows}: this architecture's positions or mask are not ones the "
                "shared-prompt layout can express"]  # fmt: skip
    for rope in ropes:
        _wrap_rope(rope)
    problem = check(model)
    if problem:
        return [f"{two_rows}: the shared-prompt layout {problem}"]
    object.__setattr__(model, _ACTIVE, True)
    return [
        "prompt computed once per pair (rows prompt | chosen | rejected; --no-share-prompt "
        "for two rows)"
    ]


def _windowed(model: nn.Module, module) -> bool:
    """Whether the model may build sliding-window masks (its code can, and its config sets a
    window): they appear only past the window, so a short probe would not show that the
    layout then fails."""
    try:
        if "window_size" not in inspect.getsource(module):
            return False
    except (OSError, TypeError):
        return True
    args = vars(getattr(model, "args", None) or {})
    return any("window" in name and value for name, value in args.items())


def check(model: nn.Module) -> str | None:
    """Compare both layouts on a probe batch (two pairs, prompts of different lengths) with
    every attention kernel the model may run; None if they agree, else what went wrong.
    They agree to round-off: ~1e-6 of the sums in float32 (the tolerance is 1e-4), ~1e-2 in
    a half-precision compute path."""
    from mlx_dpo import cpu_kernels, kernel_choice
    from mlx_dpo.data import collate
    from mlx_dpo.logps import forward_logps
    from mlx_dpo.tokenization import PreferencePair

    vocab = _vocab_size(model)
    rng = np.random.default_rng(0)

    def ids(n):
        return rng.integers(0, vocab, n).tolist()

    pairs = [
        PreferencePair(ids(p), ids(c), ids(r), "shared-prompt probe", "")
        for p, c, r in ((7, 4, 6), (3, 9, 2))
    ]
    kernels = ["mlx", "flash"] if cpu_kernels.installed(model) else ["mlx"]
    blocks = len(getattr(getattr(model, "model", model), "layers", None) or [])
    for kernel in kernels:
        with kernel_choice.pinned({"attention": kernel, "swiglu": "mlx", "head": "mlx"}):
            try:
                two, _ = forward_logps(model, collate(pairs, pad_to=8))
                _CALLS[0] = 0
                one, _ = forward_logps(model, collate(pairs, pad_to=8, share_prompt=True))
                mx.eval(two, one)
            except (UnsupportedLayout, ValueError, TypeError) as e:
                return f"cannot run here ({type(e).__name__}: {e})"
        # a block that mixes tokens otherwise (a recurrent or convolutional layer) would let
        # the rejected answer see the chosen one
        if _CALLS[0] != blocks:
            return f"met {_CALLS[0]} attention calls in {blocks} blocks"
        gap = float(mx.abs(two - one).max())
        tolerance = 1e-4 if _compute_dtype(model) == mx.float32 else 2e-2
        if not gap <= tolerance * max(1.0, float(mx.abs(two).max())):
            return f"gave other log-probs than two rows (by {gap:.3g}, {kernel} attention)"
    return None


def _compute_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the probe computed in: its embedding's output (a quantized table's too)."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    return embed(mx.array([[0]])).dtype if embed is not None else mx.float32


def _vocab_size(model: nn.Module) -> int:
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) else 32  # the probe's ids need only be valid
