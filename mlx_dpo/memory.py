"""Estimate the peak memory of a training step before training, and refuse what will not fit.

`plan(model, cfg, max_tokens_per_row, rows)` adds up what a step holds at its peak:

- weights: the model's arrays as stored (quantized storage counts its packed size);
- adapters: LoRA parameters, their gradients, and the optimizer's state (AdamW: 2 per weight);
- saved activations: what the backward keeps per block per token (every adapted block, or only
  block inputs with --grad-checkpoint) and the attention probabilities (rows x heads x T^2;
  with mlx_dpo.cpu_kernels' flash attention only a logsumexp per query, linear in T);
- dequantized weights: a quantized base computed in fp32 keeps each block's dequantized
  weights for the backward (only one block's with --grad-checkpoint);
- transient: the larger of one block's backward and the log-prob head's working set (the lean
  head's vocabulary tiles, or the full rows x T x vocab logits when the lean path is off).

The per-token and per-tile factors are not all derivable by hand: MLX's scheduler keeps ~10
ops in flight, and the order it evaluates a lazy backward graph in keeps some gradient inputs
alive longer. They were fitted against `mx.get_peak_memory()` of the compiled trainer step on
MLX 0.32's CPU backend over 160 configurations (hidden 128-768, 1-8 blocks, vocab 1k-152k,
T 128-2048, with and without checkpointing, fp32 and 4-bit) and land within ~20% of the
measured peak; the CPU kernels' factors over 30 lean fp32 ones, within 25% (benchmarks/
memory_calibration.py --grid full --fit). On Metal and CUDA the structure is the same; the factors were
not re-measured there.

`check_fits(plan)` compares the plan (plus the runtime's own ~0.5 GB) with the memory MLX can
use (`available_bytes(platform)`): Metal's recommended working set, a CUDA device's memory, or
the machine's RAM on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dpo import cpu_kernels
from mlx_dpo.config import ConfigError
from mlx_dpo.platform import Platform, detect

RUNTIME_OVERHEAD = 512 << 20  # Python, MLX, mlx-lm, tokenizer: resident but not in the plan
PAD_TO = 32  # data.collate pads rows to a multiple of this

# Fitted factors, indexed by --grad-checkpoint (see the module docstring). Per-token factors
# multiply tokens x a width (qkv: q+k+v outputs, inter: MLP intermediate, hidden: model
# width); "scores" multiplies rows x heads x T^2; "tiles" the lean head's tiles in flight.
FACTORS = {
    "default": {
        "saved": {  # kept from the forward for the backward, per differentiated block
            False: {"qkv": 2.126, "inter": 3.536, "hidden": 3.261, "scores": 0.635},
            True: {"qkv": 0.58, "inter": 1.03, "hidden": 2.539, "scores": 0.061},
        },
        "retained": {  # gradient inputs held until the LoRA gradients run (backward only)
            False: {"qkv": 0.752, "inter": 0.231, "hidden": 1.74, "scores": 0.736},
            True: {"qkv": 0.598, "inter": 0.05, "hidden": 0.115, "scores": 0.057},
        },
        "layer": {  # one block's forward + backward working set (with its recompute)
            False: {"qkv": 1.132, "inter": 5.495, "hidden": 8.897, "scores": 1.043},
            True: {"qkv": 6.239, "inter": 9.493, "hidden": 14.285, "scores": 2.743},
        },
        "head": {
            False: {"tiles": 0.976, "hidden": 23.898},
            True: {"tiles": 0.583, "hidden": 50.82},
        },
    },
}
# With mlx_dpo.cpu_kernels (x86 CPU): flash attention ("scores" is then rows x heads x 64 x T,
# one query block), 2048-wide head tiles. Fitted by benchmarks/memory_calibration.py --fit.
FACTORS["fast"] = {
    "saved": {
        False: {"qkv": 2.572, "inter": 3.628, "hidden": 2.315, "scores": 1.022},
        True: {"qkv": 0.712, "inter": 0.309, "hidden": 0.489, "scores": 0.433},
    },
    "retained": {
        False: {"qkv": 0.28, "inter": 0.911, "hidden": 1.25, "scores": 0.725},
        True: {"qkv": 0.931, "inter": 0.794, "hidden": 2.308, "scores": 2.366},
    },
    "layer": {
        False: {"qkv": 1.241, "inter": 5.052, "hidden": 2.907, "scores": 1.485},
        True: {"qkv": 2.155, "inter": 13.205, "hidden": 6.97, "scores": 4.14},
    },
    "head": {
        False: {"tiles": 2.874, "hidden": 3.851},
        True: {"tiles": 2.471, "hidden": 0.328},
    },
    "vocab_tile": 2048,
}
# RSS above (runtime + MLX's peak), as a fraction of the step's arrays above the weights:
# 0.18-0.40 measured with MLX's ops at 4 grid points (benchmarks/RESULTS.md, section 4)
_ALLOCATOR_SLACK = 0.35
OS_NOTES = {
    "runtime": "Python, MLX, mlx-lm, the BLAS: resident memory that is not an MLX array",
    "allocator cache": "freed MLX buffers kept for reuse (e.g. fp32 weights replaced by 4-bit "
    "ones at load)",
    "allocator slack": f"buffers the allocator cannot reuse at the peak: {_ALLOCATOR_SLACK:.0%} "
    "of the step's arrays",
}
_FULL_LOGITS = 2.62  # plain path: rows x T x vocab fp32 arrays alive at its peak
_DEQUANT_SAVED = 1.9  # dequantized fp32 weights (and their transposes) kept per block
_TOKEN_TILE, _VOCAB_TILE, _TILES_IN_FLIGHT = 256, 8192, 12  # logps.lean_token_logps
_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "lion": 1, "muon": 1, "sgd": 0, "adafactor": 1}


@dataclass
class MemoryPlan:
    """Estimated peak bytes of one training step, by part (insertion order = print order)."""

    parts: dict[str, int]
    notes: dict[str, str]
    rows: int
    tokens_per_row: int
    _replan: Any = field(default=None, repr=False, compare=False)
    # What the operating system sees on top of MLX's arrays (resident set size): the runtime
    # (Python, MLX, the BLAS, the tokenizer) and buffers MLX's allocator keeps cached after
    # they were freed. Empty for a what-if plan; `resident()` measures them in this process.
    os_parts: dict[str, int] = field(default_factory=dict)

    @property
    def resident_bytes(self) -> int:
        """Planned peak RSS: the MLX arrays at the step's peak plus the os_parts."""
        return self.total_bytes + sum(self.os_parts.values())

    @property
    def grad_checkpoint(self) -> bool:
        return "--grad-checkpoint" in self.notes.get("saved activations", "")

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    def __str__(self) -> str:
        width = max(map(len, self.parts))
        lines = [
            f"memory plan: {self.rows} rows x {self.tokens_per_row} tokens, "
            f"peak ~{_gb(self.total_bytes)}"
            + (f" of MLX arrays, process RSS ~{_gb(self.resident_bytes)}" if self.os_parts else "")
        ]
        for name, n in self.parts.items():
            lines.append(f"  {name:<{width}} {_gb(n):>9}  {self.notes.get(name, '')}".rstrip())
        if self.os_parts:
            lines.append(f"  process (RSS) ~{_gb(self.resident_bytes)}: the above plus")
            for name, n in self.os_parts.items():
                lines.append(f"    {name} {_gb(n)}  {OS_NOTES.get(name, '')}".rstrip())
        return "\n".join(lines)


@dataclass(frozen=True)
class _Arch:
    blocks: int
    hidden: int
    qkv: int  # q + k + v output width (queries + keys + values)
    inter: int  # MLP intermediate width
    heads: int
    vocab: int
    adapted: list  # [(block index, in, out)] of the linears LoRA goes on
    block_linear_params: int  # weights of one block's linears (for dequantized copies)
    quantized: bool


def _linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear/QuantizedLinear (or the base of a LoRA wrapper), else None."""
    module = getattr(module, "linear", module)
    if isinstance(module, nn.QuantizedLinear):
        out, groups = module["scales"].shape
        return groups * module.group_size, out
    if isinstance(module, nn.Linear):
        out, inp = module.weight.shape
        return inp, out
    return None


def _arch(model: nn.Module, cfg) -> _Arch:
    args = getattr(model, "args", None)
    layers = model.layers
    n_blocks = len(layers)
    n_adapted = n_blocks if cfg.num_layers < 0 else min(cfg.num_layers, n_blocks)
    keys = set(cfg.lora_keys) if cfg.lora_keys else None
    adapted, first = [], {}
    for i, block in enumerate(layers):
        for name, module in block.named_modules():
            dims = _linear_dims(module)
            if dims is None or name.endswith(".linear"):
                continue
            if i == 0:
                first[name] = dims
            if i >= n_blocks - n_adapted and (keys is None or name in keys):
                adapted.append((i, *dims))

    def width(*names: str) -> int:
        return sum(d[1] for n, d in first.items() if n.split(".")[-1] in names)

    hidden = getattr(args, "hidden_size", None) or next(iter(first.values()), (0, 0))[0]
    heads = getattr(args, "num_attention_heads", None) or 1
    inter = getattr(args, "intermediate_size", None) or width("gate_proj", "up_proj", "w1") // 2
    qkv = width("q_proj", "k_proj", "v_proj", "qkv_proj", "wqkv") or 3 * hidden
    vocab = getattr(args, "vocab_size", None) or 0
    quantized = any(
        isinstance(getattr(m, "linear", m), nn.QuantizedLinear)
        for _, m in layers[0].named_modules()
    )
    return _Arch(
        blocks=n_blocks,
        hidden=hidden,
        qkv=qkv,
        inter=inter,
        heads=heads,
        vocab=vocab,
        adapted=adapted,
        block_linear_params=sum(i * o for i, o in first.values()),
        quantized=quantized,
    )


def _planned_kernels(model) -> str:
    """ "fast" (flash attention, the head's 2048-wide fast-exp tiles: the fitted "fast"
    factors), "default" (MLX's ops) or "either" (chosen by timing on the first step)."""
    if not cpu_kernels.installed(model):
        return "default"
    from mlx_dpo import kernel_choice

    forced = kernel_choice.chooser().override
    if forced.get("attention") == "flash" and forced.get("head") == "exp":
        return "fast"
    if forced.get("attention") == "mlx" and forced.get("head") == "mlx":
        return "default"
    return "either"


def _head_quantized(model) -> bool:
    from mlx_dpo.logps import LMHead

    head = LMHead.from_model(model)
    return head is not None and head.quantized


def _lean_head(model) -> bool:
    from mlx_dpo.logps import LMHead

    return LMHead.from_model(model) is not None


def plan(
    model: nn.Module,
    cfg,
    max_tokens_per_row: int,
    rows: int,
    *,
    completion_tokens_per_row: int | None = None,
    lean: bool | None = None,
) -> MemoryPlan:
    """Estimated peak memory of one training step.

    Args:
        model: the loaded mlx-lm model (quantized or not, with or without adapters yet).
        cfg: a TrainConfig (lora_rank, num_layers, lora_keys, grad_checkpoint, optimizer).
        max_tokens_per_row: the longest prompt + completion row (padded up to a multiple of 32).
        rows: rows per micro-batch (2 x batch_size: chosen and rejected).
        completion_tokens_per_row: scored tokens per row (default: the whole row, worst case).
        lean: whether the completion-only log-prob head runs (default: when the model has one).
    """
    arch = _arch(model, cfg)
    lean = _lean_head(model) if lean is None else lean
    params = dict(tree_flatten(model.parameters()))
    T = PAD_TO * -(-max_tokens_per_row // PAD_TO)
    C = T if completion_tokens_per_row is None else PAD_TO * -(-completion_tokens_per_row // PAD_TO)
    common = dict(
        rows=rows,
        T=T,
        C=min(C, T),
        ckpt=bool(getattr(cfg, "grad_checkpoint", False)),
        lean=lean,
        act=4 if arch.quantized else _float_size(params),
        lora_params=sum(cfg.lora_rank * (i + o) for _, i, o in arch.adapted),
        n_states=_OPTIMIZER_STATES.get(getattr(cfg, "optimizer", "adamw"), 2),
        weights=sum(v.nbytes for k, v in params.items() if "lora_" not in k),
        head_quantized=_head_quantized(model) if lean else False,
    )
    kernels = _planned_kernels(model)
    parts, notes = estimate(arch, **common, fast=kernels == "fast")
    if kernels == "either":
        # The kernels are chosen per shape class on the first step (kernel_choice), each one
        # or MLX's own: plan for the larger of the two, part by part.
        fast_parts, fast_notes = estimate(arch, **common, fast=True)
        for k, v in fast_parts.items():
            if v > parts.get(k, 0):
                parts[k], notes[k] = v, fast_notes[k]

    def replan(**changes) -> MemoryPlan:
        new_rows = changes.pop("rows", rows)
        new_len = changes.pop("max_tokens_per_row", max_tokens_per_row)
        return plan(
            model, _Override(cfg, changes), new_len, new_rows,
            completion_tokens_per_row=completion_tokens_per_row, lean=lean,
        )  # fmt: skip

    return MemoryPlan(parts, notes, rows, T, replan)


# Each block's forward runs again in the backward: measured x1.2-1.35 the step time
# (benchmarks/RESULTS.md, "grad checkpointing (its cost)").
CHECKPOINT_TIME_COST = 1.3


def checkpoint_tradeoff(plan: MemoryPlan) -> str | None:
    """With --grad-checkpoint on: what it saves against its time cost, in one line."""
    if not plan.grad_checkpoint or plan._replan is None:
        return None
    without = plan._replan(grad_checkpoint=False).total_bytes
    saved = without - plan.total_bytes
    cost = f"~{CHECKPOINT_TIME_COST}x the step time"
    if saved <= 0:
        return f"--grad-checkpoint saves no memory for this model and batch, at {cost}; drop it"
    return (
        f"--grad-checkpoint: step peak ~{_gb(plan.total_bytes)} instead of ~{_gb(without)}, "
        f"at {cost} (each block's forward runs again in the backward)"
    )


def estimate(
    arch: _Arch,
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
    fast=False,
    head_quantized=False,
) -> tuple[dict[str, int], dict[str, str]]:
    """The plan's parts (bytes) and notes, from the architecture's numbers alone."""
    n_tok, n_scored = rows * (T - 1), rows * C
    # Attention scores: the whole T x T square, or with the CPU kernels' flash attention one
    # block of queries against the keys at a time (linear in T).
    scores = rows * arch.heads * T * (min(T, cpu_kernels.ATTENTION_BLOCK) if fast else T)
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
    f = FACTORS["fast" if fast else "default"]
    parts["saved activations"] = int(deep * act * per_token(f["saved"][ckpt]))
    notes["saved activations"] = f"{deep} blocks" + (
        ", block inputs (--grad-checkpoint)"
        if ckpt
        else ", per-token tensors + " + ("attention row sums" if fast else "T^2 scores")
    )
    if arch.quantized:
        kept = 1 if ckpt else deep
        parts["dequantized weights"] = int(_DEQUANT_SAVED * kept * 4 * arch.block_linear_params)
        notes["dequantized weights"] = f"fp32 copies of {kept} block(s) kept for the backward"
    if head_quantized:
        # the lean head dequantizes each vocabulary tile once for all token tiles (the compiled
        # step shares the identical dequantize), so the whole head is alive in fp32
        parts["dequantized output layer"] = 4 * arch.vocab * arch.hidden
        notes["dequantized output layer"] = f"fp32 copy of the {arch.vocab} x {arch.hidden} head"
    # The backward's gradient inputs MLX keeps until the LoRA gradients are evaluated grow
    # block by block on the way down, on top of one block's working set.
    layer = act * (deep * per_token(f["retained"][ckpt]) + per_token(f["layer"][ckpt]))
    if lean:
        vocab_tile = f.get("vocab_tile", _VOCAB_TILE)
        tile = min(n_scored, _TOKEN_TILE) * min(arch.vocab, vocab_tile)
        n_tiles = -(-n_scored // _TOKEN_TILE) * -(-arch.vocab // vocab_tile)
        h = f["head"][ckpt]
        head = 4 * (h["tiles"] * tile * min(2 * n_tiles + 1, _TILES_IN_FLIGHT))
        head += 4 * h["hidden"] * n_scored * arch.hidden
        head_note = f"lean log-probs ({n_scored} scored tokens, {n_tiles} tiles)"
    else:
        head = 4 * _FULL_LOGITS * n_tok * arch.vocab
        head_note = f"full logits ({rows} x {T} x {arch.vocab})"
    parts["transient"] = int(max(layer, head))
    layer_note = f"the backward's working set ({_gb(layer)})"
    head_note += f" ({_gb(head)})"
    notes["transient"] = "the larger of " + (
        f"{layer_note} and {head_note}" if layer >= head else f"{head_note} and {layer_note}"
    )
    return parts, notes


def resident(plan: MemoryPlan, rss_bytes: int | None = None) -> MemoryPlan:
    """`plan` with what the OS will see besides the step's arrays, measured in this process
    now (call it after the model is loaded): the runtime's resident memory (RSS less MLX's
    arrays and cache), the allocator's cached buffers, and a slack for buffers the allocator
    cannot reuse at the peak."""
    rss = _rss_bytes() if rss_bytes is None else rss_bytes
    active, cached = mx.get_active_memory(), mx.get_cache_memory()
    # weights are in the plan already: the runtime is what RSS holds beyond MLX's buffers
    plan.os_parts = {
        "runtime": max(rss - active - cached, 0),
        "allocator cache": cached,
        "allocator slack": int(_ALLOCATOR_SLACK * (plan.total_bytes - plan.parts["weights"])),
    }
    return plan


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes


def plan_for_pairs(model: nn.Module, cfg, pairs) -> MemoryPlan:
    """`plan` for the longest row and longest completion of tokenized `PreferencePair`s, at
    2 x cfg.batch_size rows (chosen and rejected)."""
    longest = max(
        (len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=1
    )
    completion = max((max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=1)
    step = plan(model, cfg, longest, 2 * cfg.batch_size, completion_tokens_per_row=completion)
    return resident(step)  # this process, the model loaded: what the OS will see


class _Override:
    """cfg with some attributes replaced (for the suggestions in check_fits)."""

    def __init__(self, cfg, changes: dict):
        self._cfg, self._changes = cfg, changes

    def __getattr__(self, name: str):
        return self._changes[name] if name in self._changes else getattr(self._cfg, name)


def _float_size(params: dict) -> int:
    sizes = [v.dtype.size for v in params.values() if mx.issubdtype(v.dtype, mx.floating)]
    return max(set(sizes), key=sizes.count) if sizes else 4


def available_bytes(plat: Platform | None = None) -> tuple[int, str]:
    """(bytes MLX may use, where the number comes from) on `plat` (default: this machine).

    Metal: the recommended working set (~75% of unified memory; more gets paged out or fails);
    CUDA: the GPU's total memory when the device reports it; a CPU: the machine's RAM. Keys of
    `mx.device_info()` differ per backend, so each is read only where it exists."""
    plat = plat or detect()
    info = plat.device_info
    if plat.backend == "metal" and info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    if plat.backend == "cuda" and info.get("total_memory"):
        return int(info["total_memory"]), "the CUDA device's memory"
    if plat.memory_bytes > 0:
        return plat.memory_bytes, "unified memory" if plat.backend == "metal" else "total RAM"
    return 0, "unknown"


def check_fits(
    plan: MemoryPlan, available: int | None = None, plat: Platform | None = None
) -> None:
    """Raise ConfigError, with the numbers and what to change, when the step will not fit."""
    source = "given"
    if available is None:
        available, source = available_bytes(plat)
    overhead = sum(plan.os_parts.values()) if plan.os_parts else RUNTIME_OVERHEAD
    need = plan.total_bytes + overhead
    if available <= 0 or need <= available:
        return
    big = sorted(plan.parts.items(), key=lambda kv: -kv[1])[:3]
    options = []
    if plan._replan is not None:
        tries = []
        if plan.rows > 2:
            tries.append(("--batch-size " + str(max(plan.rows // 4, 1)), {"rows": plan.rows // 2}))
        if not plan.grad_checkpoint:
            tries.append(("--grad-checkpoint", {"grad_checkpoint": True}))
        if plan.tokens_per_row > 2 * PAD_TO:
            half = plan.tokens_per_row // 2
            tries.append((f"--max-length {half}", {"max_tokens_per_row": half}))
        for flag, change in tries:
            try:
                total = plan._replan(**change).total_bytes + overhead
            except (TypeError, ValueError, ZeroDivisionError):
                continue
            if total < need:
                options.append(f"{flag} (~{_gb(total)})")
    if "dequantized weights" not in plan.parts:
        options.append("--quantize 4 (4-bit base weights)")
    raise ConfigError(
        f"a training step needs ~{_gb(need)} ({_gb(plan.total_bytes)} planned + "
        f"{_gb(overhead)} runtime and allocator) but only {_gb(available)} is available ({source}); "
        f"largest parts: {', '.join(f'{k} {_gb(v)}' for k, v in big)}. "
        f"Try: {'; '.join(options)}"
    )


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"
