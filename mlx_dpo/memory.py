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

How each part is computed, with factors fitted against measured peaks, is in
`mlx_dpo.memory_factors`; what the OS sees besides the arrays (`resident`) and what the
machine offers (`available_bytes`) in `mlx_dpo.memory_os`.

`check_fits(plan)` compares the plan (plus the runtime's own ~0.5 GB) with the memory MLX can
use (`available_bytes(platform)`): Metal's recommended working set, a CUDA device's memory, or
the machine's RAM on a CPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_dpo import cpu_kernels, lora_kernel, shared_prompt
from mlx_dpo.config import ConfigError
from mlx_dpo.data import row_length
from mlx_dpo.memory_factors import Arch, attention_tile_bytes, estimate, gb
from mlx_dpo.memory_os import (
    OS_NOTES,
    RUNTIME_OVERHEAD,
    available_bytes,
    resident,
    runtime_bytes,
)
from mlx_dpo.platform import Platform

PAD_TO = 32  # data.collate pads rows to a multiple of this

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
    # The process's peak RSS when the plan was made: loading (a quantized model's fp32 weights)
    # and the kernels' timing (MLX's attention keeps T^2 scores) can top the step itself.
    peak_so_far: int = 0
    # Bytes of one block's flash attention score tiles: each query block's tile has its own
    # size, so freed tiles stay in MLX's size-keyed cache, unused by other sizes (memory_os).
    attention_tiles: int = 0
    shared: bool = False  # the shared-prompt layout: rows // 2 rows through the blocks

    @property
    def step_resident_bytes(self) -> int:
        """The step's peak RSS: its MLX arrays plus the os_parts."""
        return self.total_bytes + sum(self.os_parts.values())

    @property
    def resident_bytes(self) -> int:
        """Planned peak RSS of the run: the step's, or the peak the process already reached."""
        return max(self.step_resident_bytes, self.peak_so_far)

    @property
    def grad_checkpoint(self) -> bool:
        return "--grad-checkpoint" in self.notes.get("saved activations", "")

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    def __str__(self) -> str:
        width = max(map(len, self.parts))
        rows = (
            f"{self.rows // 2} rows (prompt | chosen | rejected)"
            if self.shared
            else f"{self.rows} rows"
        )
        lines = [
            f"memory plan: {rows} x {self.tokens_per_row} tokens, "
            f"peak ~{gb(self.total_bytes)}"
            + (f" of MLX arrays, process RSS ~{gb(self.resident_bytes)}" if self.os_parts else "")
        ]
        for name, n in self.parts.items():
            lines.append(f"  {name:<{width}} {gb(n):>9}  {self.notes.get(name, '')}".rstrip())
        if self.os_parts:
            lines.append(f"  process (RSS) ~{gb(self.step_resident_bytes)}: the above plus")
            for name, n in self.os_parts.items():
                lines.append(f"    {name} {gb(n)}  {OS_NOTES.get(name, '')}".rstrip())
        if self.peak_so_far > self.step_resident_bytes:
            lines.append(
                f"  the process already peaked at {gb(self.peak_so_far)} RSS before training "
                "(loading the model, timing the CPU kernels)"
            )
        return "\n".join(lines)


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


def _arch(model: nn.Module, cfg) -> Arch:
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
    return Arch(
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


_PLANNED = ("attention", "head", "lora", "swiglu")  # the kernels that change a step's memory


def _planned_kernels(model, kernels: dict | None) -> dict[str, list[str]]:
    """Per kernel that changes the step's memory, the candidates the plan covers: the one
    chosen (`kernels`, from cpu_kernels.step_choices, or forced by MLX_DPO_KERNELS), MLX's
    own where the CPU kernels are not installed, or every candidate where the choice is still
    to be made by timing on the first step (the plan then takes each part's largest)."""
    if not cpu_kernels.installed(model):
        return {k: ["mlx"] for k in _PLANNED}
    from mlx_dpo import kernel_choice

    known = {**kernel_choice.chooser().override, **(kernels or {})}
    if not cpu_kernels.swiglu_installed(model):
        known["swiglu"] = "none"  # no SwiGLU to choose: the MLP as the factors were fitted
    return {k: [known[k]] if k in known else list(kernel_choice.CANDIDATES[k]) for k in _PLANNED}


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
    kernels: dict[str, str] | None = None,
    shared: bool = False,
    attention_tokens_per_row: int | None = None,
) -> MemoryPlan:
    """Estimated peak memory of one training step.

    Args:
        model: the loaded mlx-lm model (quantized or not, with or without adapters yet).
        cfg: a TrainConfig (lora_rank, num_layers, lora_keys, grad_checkpoint, optimizer).
        max_tokens_per_row: the longest prompt + completion row (padded up to a multiple of 32).
        rows: rows per micro-batch (2 x batch_size: chosen and rejected).
        completion_tokens_per_row: scored tokens per row (default: the whole row, worst case).
        lean: whether the completion-only log-prob head runs (default: when the model has one).
        kernels: the CPU kernels the step will run (cpu_kernels.step_choices); those not
            given are covered whichever way their timing goes.
        shared: the shared-prompt layout (mlx_dpo.shared_prompt): rows // 2 rows through the
            blocks, each `max_tokens_per_row` long (prompt + both answers), and attention
            `rows` rows `attention_tokens_per_row` long (each answer's own row).
    """
    arch = _arch(model, cfg)
    lean = _lean_head(model) if lean is None else lean
    params = dict(tree_flatten(model.parameters()))
    T = _padded(max_tokens_per_row)
    C = T if completion_tokens_per_row is None else _padded(completion_tokens_per_row)
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
        shared=shared,
        T_att=T if attention_tokens_per_row is None else _padded(attention_tokens_per_row),
    )
    parts: dict[str, int] = {}
    notes: dict[str, str] = {}
    options = _planned_kernels(model, kernels)
    offered = cpu_kernels.head_candidates(rows * C, arch.vocab)
    heads = [h for h in options["head"] if h in offered]
    for attention, head, lora, swiglu in itertools.product(
        options["attention"], heads or options["head"], options["lora"], options["swiglu"]
    ):
        p, n = estimate(arch, **common, attention=attention, head=head, lora=lora, swiglu=swiglu)
        for k, v in p.items():
            if v > parts.get(k, -1):
                parts[k], notes[k] = v, n[k]

    def replan(**changes) -> MemoryPlan:
        new_rows = changes.pop("rows", rows)
        new_len = changes.pop("max_tokens_per_row", max_tokens_per_row)
        return plan(
            model, _Override(cfg, changes), new_len, new_rows,
            completion_tokens_per_row=completion_tokens_per_row, lean=lean, kernels=kernels,
            shared=shared, attention_tokens_per_row=attention_tokens_per_row,
        )  # fmt: skip

    blocks = [
        cpu_kernels.FLASH_BLOCKS[a] for a in options["attention"] if a in cpu_kernels.FLASH_BLOCKS
    ]
    tiles = max((attention_tile_bytes(arch, rows, common["T_att"], q) for q in blocks), default=0)
    return MemoryPlan(parts, notes, rows, T, replan, attention_tiles=tiles, shared=shared)


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
        f"--grad-checkpoint: step peak ~{gb(plan.total_bytes)} instead of ~{gb(without)}, "
        f"at {cost} (each block's forward runs again in the backward)"
    )


def plan_for_pairs(model: nn.Module, cfg, pairs) -> MemoryPlan:
    """`plan` for the longest row and longest completion of tokenized `PreferencePair`s, at
    2 x cfg.batch_size rows (chosen and rejected; one row per pair in the shared-prompt
    layout), with the CPU kernels that step will run chosen now (timed where no decision is
    cached: the first step would do it anyway)."""
    shared = shared_prompt.active(model)
    longest = max((row_length(p, shared) for p in pairs), default=1)
    own_row = max((row_length(p) for p in pairs), default=1)  # attention's rows
    completion = max((max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=1)
    rows = 2 * cfg.batch_size
    block_rows = rows // 2 if shared else rows
    T, C = _padded(longest), min(_padded(completion), _padded(longest))
    runtime = runtime_bytes()  # before the kernels' timing leaves freed buffers in the heap
    kernels = cpu_kernels.step_choices(
        model,
        rows,
        T,
        C,
        mlp_ranks=_mlp_ranks(model, cfg),
        block_rows=block_rows,
        attention_T=_padded(own_row),
    )
    if kernels:  # the CPU kernels run: the adapters' call too, as the step will decide it
        arch, params = _arch(model, cfg), dict(tree_flatten(model.parameters()))
        kernels["lora"] = lora_kernel.step_choice(
            [(i, o) for _, i, o in arch.adapted],
            cfg.lora_rank,
            block_rows * (T - 1),
            dropout=getattr(cfg, "lora_dropout", 0.0),
            float32=arch.quantized or _float_size(params) == 4,
        )
    step = plan(
        model, cfg, longest, rows, completion_tokens_per_row=completion, kernels=kernels,
        shared=shared, attention_tokens_per_row=own_row,
    )  # fmt: skip
    return resident(step, runtime=runtime)  # this process, the model loaded: what the OS sees


def _mlp_ranks(model: nn.Module, cfg) -> dict[str, int]:
    """LoRA rank per MLP projection of the last block once the run's adapters are in (the
    plan comes before them): those already there (--init-adapter), else the configuration's."""
    live = cpu_kernels.mlp_lora_ranks(model)
    if live or cfg.num_layers == 0:
        return live
    mlp, keys = cpu_kernels.last_mlp(model), cfg.lora_keys
    return {
        n: cfg.lora_rank
        for n in cpu_kernels.MLP_PROJECTIONS
        if hasattr(mlp, n) and (keys is None or f"mlp.{n}" in keys)
    }


def _padded(n: int) -> int:
    return PAD_TO * -(-n // PAD_TO)


class _Override:
    """cfg with some attributes replaced (for the suggestions in check_fits)."""

    def __init__(self, cfg, changes: dict):
        self._cfg, self._changes = cfg, changes

    def __getattr__(self, name: str):
        return self._changes[name] if name in self._changes else getattr(self._cfg, name)


def _float_size(params: dict) -> int:
    sizes = [v.dtype.size for v in params.values() if mx.issubdtype(v.dtype, mx.floating)]
    return max(set(sizes), key=sizes.count) if sizes else 4


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
                options.append(f"{flag} (~{gb(total)})")
    if "dequantized weights" not in plan.parts:
        options.append("--quantize 4 (4-bit base weights)")
    raise ConfigError(
        f"a training step needs ~{gb(need)} ({gb(plan.total_bytes)} planned + "
        f"{gb(overhead)} runtime and allocator) but only {gb(available)} is available ({source}); "
        f"largest parts: {', '.join(f'{k} {gb(v)}' for k, v in big)}. "
        f"Try: {'; '.join(options)}"
    )
