"""The memory of one training step from an architecture's numbers: `estimate` and its fitted
factors (the planner, `mlx_dpo.memory`, reads the numbers off a loaded model).

The parts: the weights as stored; the LoRA parameters with their gradients and optimizer state;
the activations the backward keeps per block per token (every adapted block, or only block
inputs with --grad-checkpoint) and the attention probabilities (rows x heads x T^2; with
mlx_dpo.cpu_kernels' flash attention only a logsumexp per query, linear in T); a quantized
base's dequantized weights kept for the backward; and the transient peak, the larger of one
block's backward and the log-prob head's working set.

The per-token and per-tile factors are not all derivable by hand: MLX's scheduler keeps ~10
ops in flight, and the order it evaluates a lazy backward graph in keeps some gradient inputs
alive longer. They were fitted against `mx.get_peak_memory()` of the compiled trainer step on
MLX 0.32's CPU backend: MLX's own operations' ("default": the CPU kernels opted out) over 134
lean fp32 steps (hidden 128-896, 1-30 blocks, vocab 1k-152k, T 128-2048, both layouts) and 18
depth pairs (each within 3%), 0.90-1.15x the measured peak without checkpointing and 0.80-1.37x
with it (0.92-1.14x from hidden 256 up; RESULTS.md section 1t); the CPU kernels' factors over
235 lean fp32 ones (1-30 blocks, both layouts, the fused and mlx-lm's LoRA adapters, the fused
and MLX's SwiGLU) and, without checkpointing, the growth of the peak with depth (17 pairs of one
step at 2 and 8-30 blocks, each within 2%): 0.91-1.11x the measured peak without checkpointing
and 0.88-1.46x with it, median 1.00-1.09 by group (benchmarks/memory_calibration.py --grid
full/depth --fit; RESULTS.md section 1s). A step that runs MLX's attention with the fused
SwiGLU or adapters (MLX_DPO_KERNELS=attention=off) takes the "default" factors less the
extras below.
On Metal and CUDA the structure is the same; the factors were not re-measured there.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_dpo import cpu_kernels, logps

# Fitted factors, indexed by --grad-checkpoint (see the module docstring). Per-token factors
# multiply tokens x a width (qkv: q+k+v outputs, inter: MLP intermediate, hidden: model
# width); "scores" multiplies rows x heads x T^2; "tiles" the lean head's tiles in flight.
FACTORS = {
    "default": {
        "saved": {  # kept from the forward for the backward, per differentiated block
            False: {"qkv": 1.693, "inter": 5.173, "hidden": 3.675, "scores": 1.043},
            True: {"qkv": 0.642, "inter": 0.83, "hidden": 1.013, "scores": 0.004},
        },
        "retained": {  # gradient inputs held until the LoRA gradients run (backward only)
            False: {"qkv": 0.0, "inter": 0.0, "hidden": 0.0, "scores": 0.0},
            True: {"qkv": 0.021, "inter": 0.002, "hidden": 0.635, "scores": 0.107},
        },
        "layer": {  # one block's forward + backward working set (with its recompute)
            False: {"qkv": 0.001, "inter": 3.742, "hidden": 21.574, "scores": 1.761},
            True: {"qkv": 4.199, "inter": 13.87, "hidden": 10.819, "scores": 3.298},
        },
        "head": {
            False: {"tiles": 1.086, "hidden": 12.649},
            True: {"tiles": 0.759, "hidden": 51.078},
        },
    },
}
# With mlx_dpo.cpu_kernels (x86 CPU): flash attention ("scores" is then rows x heads x block x T,
# one query block of 64, 32 or 16), the fast exp in 2048-wide head tiles, the fused LoRA
# adapters. Fitted by benchmarks/memory_calibration.py --fit with every kernel on, over both
# layouts (two rows per pair, the shared prompt's one), the per-block factors pinned by depth
# pairs (the earlier ones counted 11% too much per block at 30 blocks: RESULTS.md 1s); with
# --grad-checkpoint a block keeps at least its input (hidden >= 1). A step that mixes kernels
# (they are chosen one by one) takes the blocks' factors from its attention, the head's from
# its head tiles, and adds _ADAPTER_EXTRA where the adapters keep mlx-lm's call.
FACTORS["fast"] = {
    "saved": {
        False: {"qkv": 1.804, "inter": 3.897, "hidden": 2.434, "scores": 2.663},
        True: {"qkv": 0.041, "inter": 0.483, "hidden": 1.012, "scores": 0.005},
    },
    "retained": {
        False: {"qkv": 0.001, "inter": 0.006, "hidden": 0.013, "scores": 0.011},
        True: {"qkv": 0.913, "inter": 0.001, "hidden": 0.006, "scores": 0.003},
    },
    "layer": {
        False: {"qkv": 0.015, "inter": 3.281, "hidden": 8.215, "scores": 1.653},
        True: {"qkv": 0.478, "inter": 13.929, "hidden": 12.991, "scores": 4.566},
    },
    "head": {
        False: {"tiles": 1.525, "hidden": 17.369},
        True: {"tiles": 1.596, "hidden": 0.102},
    },
}
# mlx-lm's LoRA call (x W^T + scale (x A) B) against mlx_dpo.lora_kernel's fused one, which the
# "fast" factors above were fitted with: what it holds more, per token x the adapted
# projections' output widths of one block, kept per differentiated block ("saved") and in one
# block's working set ("layer"). Fitted by benchmarks/memory_calibration.py --fit.
_ADAPTER_EXTRA = {
    False: {"saved": 0.07, "layer": 1.102},
    True: {"saved": 0.255, "layer": 1.484},
}
# MLX's SwiGLU (silu(gate) * up as separate ops) against mlx_dpo.cpu_kernels' fused one, which
# the "fast" factors were fitted with: what it holds more per token x the MLP's intermediate
# width, kept per differentiated block ("saved") and in one block's working set ("layer").
# Measured, not fitted: one more fp32 intermediate-wide tensor per token per block (30 blocks,
# 8,184 tokens: MLX's peak 2,105 MiB above the fused one's, 0.97 of that tensor; 4 blocks:
# 5.9 MB, tests/test_memory.py). The calibration's runs with --kernels all=on,swiglu=off
# (1-24 blocks, no depth pairs) fit 0.2-0.75 per block and the rest in the working set: the two
# scale alike there, and only depth tells them apart. With --grad-checkpoint it fits 0 (the
# recompute keeps nothing).
_SWIGLU_EXTRA = {
    False: {"saved": 1.0, "layer": 0.0},
    True: {"saved": 0.0, "layer": 0.0},
}
_FULL_LOGITS = 2.62  # plain path: rows x T x vocab fp32 arrays alive at its peak
# Dequantized fp32 weights kept per block for the backward, in block weights: with MLX's ops
# (fitted) they and their transposes; with the CPU kernels' step about one copy (40M Qwen2-style,
# 4-bit, 2 pairs x 256/512 tokens: 145/94 MB above the fp32 run's peak, 90 MB of fp32 blocks and
# a 62 MB head; benchmarks/RESULTS.md section 4b)
_DEQUANT_SAVED = {"default": 1.9, "fast": 1.0}
_TILES_IN_FLIGHT = 12  # logps.lean_token_logps' tiles MLX keeps in flight


@dataclass(frozen=True)
class Arch:
    """The numbers of a model the estimate needs."""

    blocks: int
    hidden: int
    qkv: int  # q + k + v output width (queries + keys + values)
    inter: int  # MLP intermediate width
    heads: int
    vocab: int
    adapted: list  # [(block index, in, out)] of the linears LoRA goes on
    block_linear_params: int  # weights of one block's linears (for dequantized copies)
    quantized: bool


def estimate(
    arch: Arch,
    *,
    rows,
    T,
    C,
    ckpt,
    lean,
    act,
    lora_params,
    n_states,
    weights,
    attention="mlx",
    head="mlx",
    head_quantized=False,
    shared=False,
    T_att=None,
    lora="mlx",
    swiglu="mlx",
) -> tuple[dict[str, int], dict[str, str]]:
    """The plan's parts (bytes) and notes, from the architecture's numbers alone, for the
    step's `attention` ("mlx" or a key of cpu_kernels.FLASH_BLOCKS), `head` tiles (a key
    of logps.HEAD_OPTIONS), LoRA call (`lora`: mlx-lm's "mlx" or the CPU kernels' "fused"
    everywhere, or the (in, out) widths of the projections that keep mlx-lm's, the rest fused)
    and SwiGLU (`swiglu`: MLX's ops "mlx", the CPU kernels' "fused", or "none": an MLP the
    kernels do not replace, as the factors were fitted).
    `rows` are the rows the head scores (2 per pair); with `shared` (the shared-prompt layout)
    the blocks run half as many, T tokens long, and attention `rows` rows of `T_att` tokens
    (each answer's own row: the two-row layout's length; default T)."""
    block_rows = rows // 2 if shared else rows
    n_tok = block_rows * (T - 1)
    block = cpu_kernels.FLASH_BLOCKS.get(attention)
    fast = block is not None
    # Attention scores: the whole T x T square, or with the CPU kernels' flash attention one
    # block of queries against the keys at a time (linear in T).
    T_att = T if T_att is None else T_att
    scores = rows * arch.heads * T_att * (min(T_att, block) if fast else T_att)
    # Blocks from the lowest adapted one up are differentiated through; those below are not.
    deep = arch.blocks - min(i for i, _, _ in arch.adapted) if arch.adapted else 0

    def per_token(f: dict) -> float:
        widths = {"qkv": arch.qkv, "inter": arch.inter, "hidden": arch.hidden}
        return n_tok * sum(f[k] * widths[k] for k in widths) + f["scores"] * scores

    parts: dict[str, int] = {"weights": weights}
    notes = {"weights": "quantized storage" if arch.quantized else "as stored"}
    parts["adapters + optimizer"] = 4 * lora_params * (2 + n_states)
    notes["adapters + optimizer"] = (
        f"{lora_params / 1e6:.2f}M LoRA params, their grads, {n_states} optimizer states"
    )
    blocks = "fast" if fast else "default"
    f = FACTORS[blocks]
    # the "fast" factors were fitted with the fused adapters, the "default" ones with mlx-lm's:
    # the extra adds mlx-lm's call's for the projections that keep it (none when "fused") to
    # the former, and takes it off the latter for the fused ones (a step with MLX's attention
    # and the fused adapters: MLX_DPO_KERNELS=attention=off)
    extra = _ADAPTER_EXTRA[ckpt]
    mlx_lm_call = () if lora == "fused" else None if lora == "mlx" else lora  # None: all
    mlx_lm_out = _adapted_out_per_block(arch, mlx_lm_call)
    adapted_out = n_tok * (mlx_lm_out if fast else mlx_lm_out - _adapted_out_per_block(arch))
    # likewise MLX's SwiGLU (the "default" factors were fitted with it)
    mlp = _SWIGLU_EXTRA[ckpt]
    mlp_tokens = n_tok * arch.inter * ((swiglu == "mlx") if fast else -(swiglu == "fused"))
    parts["saved activations"] = int(
        deep * act * (
            per_token(f["saved"][ckpt]) + extra["saved"] * adapted_out
            + mlp["saved"] * mlp_tokens
        )
    )  # fmt: skip
    notes["saved activations"] = f"{deep} blocks" + (
        ", block inputs (--grad-checkpoint)"
        if ckpt
        else ", per-token tensors + " + ("attention row sums" if fast else "T^2 scores")
    )
    if arch.quantized:
        kept = 1 if ckpt else deep
        parts["dequantized weights"] = int(
            _DEQUANT_SAVED[blocks] * kept * 4 * arch.block_linear_params
        )
        notes["dequantized weights"] = f"fp32 copies of {kept} block(s) kept for the backward"
    if head_quantized:
        # the lean head dequantizes each vocabulary tile once for all token tiles (the compiled
        # step shares the identical dequantize), so the whole head is alive in fp32
        parts["dequantized output layer"] = 4 * arch.vocab * arch.hidden
        notes["dequantized output layer"] = f"fp32 copy of the {arch.vocab} x {arch.hidden} head"
    # The backward's gradient inputs MLX keeps until the LoRA gradients are evaluated grow
    # block by block on the way down, on top of one block's working set.
    layer = act * (
        deep * per_token(f["retained"][ckpt])
        + per_token(f["layer"][ckpt])
        + extra["layer"] * adapted_out
        + mlp["layer"] * mlp_tokens
    )
    head_factors, vocab_tile, kept = _head_tiles(head)
    head, head_note = _head_working_set(
        arch, FACTORS[head_factors]["head"][ckpt], vocab_tile, lean=lean, rows=rows, T=T, C=C,
        block_rows=block_rows,
    )  # fmt: skip
    if kept and lean:  # held from the head's forward to its backward, on top of its tiles
        head += 4 * rows * C * arch.vocab
        head_note += ", their logits kept for the backward"
    parts["transient"] = int(max(layer, head))
    layer_note = f"the backward's working set ({gb(layer)})"
    head_note += f" ({gb(head)})"
    notes["transient"] = "the larger of " + (
        f"{layer_note} and {head_note}" if layer >= head else f"{head_note} and {layer_note}"
    )
    return parts, notes


def _adapted_out_per_block(arch: Arch, only=None) -> float:
    """Output width of the adapted projections (`only` those of these (in, out) widths),
    averaged over the adapted blocks."""
    blocks = {i for i, _, _ in arch.adapted}
    widths = [o for _, i, o in arch.adapted if only is None or (i, o) in only]
    return sum(widths) / len(blocks) if blocks else 0.0


def _head_tiles(head: str) -> tuple[str, int, bool]:
    """A head candidate's (factor set, vocabulary tile width, whether the scored tokens' N x V
    fp32 logits are kept from the forward for the backward), read off its logps.HEAD_OPTIONS
    as lean_token_logps reads them."""
    options = logps.HEAD_OPTIONS[head]
    fast = options.get("fast_exp", False)
    tile = min(logps.VOCAB_CHUNK, options["exp_tile"]) if fast else logps.VOCAB_CHUNK
    return ("fast" if fast else "default"), tile, options.get("keep_logits", False)


def attention_tile_bytes(
    arch: Arch, rows: int, T: int, q: int = cpu_kernels.ATTENTION_BLOCK
) -> int:
    """fp32 bytes of one transformer block's flash attention score tiles, every query block's
    once: query block b (of `q` queries) against the b * q keys up to its end, so about half
    a T x T square per row and head."""
    scores = sum(min(q, T - a) * min(a + q, T) for a in range(0, T, q))  # queries x keys
    return 4 * rows * arch.heads * scores


def _head_working_set(
    arch: Arch, h: dict, vocab_tile, *, lean, rows, T, C, block_rows
) -> tuple[float, str]:
    """Bytes and note of the log-prob head's peak: the lean head's vocabulary tiles in flight
    (and its hidden-state copies), or the full block_rows x T x vocab logits."""
    n_tok, n_scored = block_rows * (T - 1), rows * C
    if not lean:
        note = f"full logits ({block_rows} x {T} x {arch.vocab})"
        return 4 * _FULL_LOGITS * n_tok * arch.vocab, note
    tile = min(n_scored, logps.TOKEN_CHUNK) * min(arch.vocab, vocab_tile)
    n_tiles = -(-n_scored // logps.TOKEN_CHUNK) * -(-arch.vocab // vocab_tile)
    head = 4 * (h["tiles"] * tile * min(2 * n_tiles + 1, _TILES_IN_FLIGHT))
    head += 4 * h["hidden"] * n_scored * arch.hidden
    return head, f"lean log-probs ({n_scored} scored tokens, {n_tiles} tiles)"


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"
