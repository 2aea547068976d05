"""The one configuration object of a training run.

`TrainConfig` is the single source of defaults and help texts: the CLI builds its flags from
its fields (`cli.py`), a YAML file maps onto the same names, and the resolved config is saved
with the run. Precedence: command-line flag > YAML > dataclass default. Checks that can be made
without loading anything run in `__post_init__` and raise `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_dpo.config_values import ConfigError, coerce
from mlx_dpo.loss_options import F_DIVERGENCE_TYPES, LOSS_TYPES

TRUNCATION_MODES = ("keep_start", "keep_end")
REPORT_TO = ("wandb", "tensorboard")  # report.py's sinks
LOSS_FIELDS = (
    "loss_type",
    "loss_weights",
    "beta",
    "label_smoothing",
    "reference_free",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "discopop_tau",
    "ipo_length_normalize",
    "rpo_alpha",
    "simpo_gamma",
    "use_weighting",
    "ld_alpha",
)


def _f(default: Any, help: str, **meta: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # --- model and data
    model: str | None = _f(
        None, "Hugging Face id or local path of an mlx-lm model (default: the bundled demo model)."
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of --model.")
    data: str | None = _f(
        None,
        "Directory, file (.jsonl/.json/.parquet, also .jsonl.gz/.json.gz/.jsonl.zst) or Hub dataset id (default: the bundled demo data).",
    )
    data_split: str | None = _f(None, "Split of a Hub dataset to train on (default: train).")
    data_config: str | None = _f(None, "Configuration (subset) of a Hub dataset.")
    data_dir: str | None = _f(
        None, "Subfolder of the dataset to read (a Hub dataset's data_dir, e.g. harmless-base)."
    )
    data_revision: str | None = _f(None, "Hub revision of --data.")
    prompt_field: str = _f("prompt", "Column holding the prompt.")
    chosen_field: str = _f("chosen", "Column holding the preferred completion.")
    rejected_field: str = _f("rejected", "Column holding the dispreferred completion.")
    skip_invalid_rows: bool = _f(
        False,
        "Skip rows with structural errors (malformed JSON, wrong types, missing fields) instead of failing; they are listed in skipped_rows.jsonl of the run. More than half invalid still fails.",
    )
    hh_as_messages: bool | None = _f(
        None,
        "Parse Anthropic HH transcripts ('Human: ... Assistant: ...' turns) into chat messages so the chat template applies (default: when every row is one); --no-hh-as-messages keeps them as text.",
    )
    min_score_margin: float | None = _f(
        None,
        "Keep only scored pairs (score_chosen/score_rejected, chosen-rating/rejected-rating) whose chosen score beats the rejected one by at least this.",
    )
    valid_fraction: float = _f(
        0.05, "Share of train rows held out for validation when the data has no validation split."
    )
    chat_template: str | None = _f(
        None,
        "Chat template for conversational rows when the tokenizer has none: a file, a template string, or 'chatml'.",
    )
    max_length: int = _f(
        1024, "Longest prompt+completion row in tokens; longer rows are truncated."
    )
    max_prompt_length: int | None = _f(
        None, "Longest prompt in tokens (default: no separate limit)."
    )
    truncation_mode: str = _f(
        "keep_start", "Which end of an over-long row to keep.", choices=TRUNCATION_MODES
    )
    # --- adapters
    adapter_path: str = _f(
        "adapters", "Output directory of the run: adapters, checkpoints, metrics, config."
    )
    fine_tune_type: str = _f("lora", "Adapter type.", choices=("lora", "dora"))
    num_layers: int = _f(
        16, "Number of transformer blocks (from the last) that get adapters; -1 for all."
    )
    lora_rank: int = _f(8, "LoRA rank.")
    lora_scale: float = _f(20.0, "LoRA scale (mlx-lm's convention: the update is scale * B A).")
    lora_dropout: float = _f(
        0.0, "LoRA dropout. Non-zero makes policy and reference differ at step 0."
    )
    lora_keys: list[str] | None = _f(
        None,
        "Module names inside a block to adapt, e.g. self_attn.q_proj (default: every linear layer).",
    )
    init_adapter: str | None = _f(
        None,
        "Start from this adapter directory (an SFT adapter, say); it becomes part of the reference.",
    )
    start_adapter: str | None = _f(
        None,
        "Start the policy from this adapter directory's weights; unlike --init-adapter it is not part of the reference (mlx_dpo iterate continues each round from the last).",
    )
    ref_model: str | None = _f(
        None, "A separate reference model (default: the base model with adapters off)."
    )
    quantize: int | None = _f(
        None, "Quantize the base model at load time to this many bits.", choices=(4, 8)
    )
    q_group_size: int = _f(
        64,
        "Preferred quantization group size; a divisor of each layer's width is chosen when it does not divide.",
    )
    compute_dtype: str = _f(
        "auto",
        "Dtype of the frozen base's matmuls: auto = float32 on the CPU (dequantize at use), the model's own dtype on a GPU.",
        choices=("auto", "float32", "bfloat16", "float16", "native"),
    )
    # --- loss
    loss_type: list[str] = _f(
        ["sigmoid"], "Loss type(s); several are summed with --loss-weights.", choices=LOSS_TYPES
    )
    loss_weights: list[float] | None = _f(None, "One weight per loss type (default 1.0 each).")
    beta: float = _f(0.1, "Temperature of the implicit reward beta * log(pi/pi_ref).")
    label_smoothing: float = _f(
        0.0, "Label noise epsilon: cDPO for sigmoid, robust, exo_pair, aot."
    )
    reference_free: bool = _f(False, "Ignore the reference (its log-ratio is taken as 0).")
    f_divergence_type: str = _f(
        "reverse_kl",
        "f-divergence of the regulariser.",
        choices=F_DIVERGENCE_TYPES,
    )
    f_alpha_divergence_coef: float = _f(0.5, "Alpha of the alpha divergence.")
    discopop_tau: float = _f(0.05, "Temperature of the discopop loss.")
    ipo_length_normalize: bool = _f(
        True, "IPO on length-averaged log-probs (TRL); off = the paper code's summed form."
    )
    rpo_alpha: float | None = _f(None, "RPO: add alpha * NLL of the chosen completion to the loss.")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin gamma.")
    use_weighting: bool = _f(
        False, "WPO: weight each pair's loss by the policy's own probability of both answers."
    )
    ld_alpha: float | None = _f(
        None,
        "LD-DPO: weight in [0, 1] of the longer answer's tokens past the shorter one's length.",
    )
    # --- optimisation
    iters: int = _f(200, "Optimizer updates to run.")
    epochs: float | None = _f(None, "Train for this many passes over the data instead of --iters.")
    batch_size: int = _f(
        4, "Preference pairs per micro-batch (each pair is 2 rows: chosen and rejected)."
    )
    grad_accumulation_steps: int = _f(1, "Micro-batches per optimizer update.")
    learning_rate: float = _f(1e-5, "Peak learning rate.")
    optimizer: str = _f(
        "adamw",
        "Optimizer from mlx.optimizers.",
        choices=("adamw", "adam", "sgd", "adafactor", "lion", "muon"),
    )
    weight_decay: float = _f(0.0, "Decoupled weight decay (adamw, lion).")
    lr_schedule: str = _f(
        "cosine", "Learning-rate decay after warm-up.", choices=("cosine", "linear", "constant")
    )
    warmup_steps: int = _f(0, "Linear warm-up updates from 0 to the learning rate.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")
    grad_checkpoint: bool = _f(
        False, "Recompute block activations in the backward pass: less memory, ~30% more time."
    )
    share_prompt: bool = _f(
        True,
        "Run a pair's prompt once: one row prompt | chosen | rejected (off: two rows per pair).",
    )
    seed: int = _f(0, "Seed of data order, LoRA initialisation and dropout.")
    # --- reporting and checkpoints
    steps_per_report: int = _f(10, "Report training metrics every N updates.")
    steps_per_eval: int = _f(50, "Validate every N updates (0 disables).")
    val_batches: int = _f(-1, "Validation micro-batches per evaluation; -1 for the whole split.")
    save_every: int = _f(100, "Write a checkpoint every N updates (and always at the end).")
    resume: bool = _f(
        False,
        "Continue the run in --adapter-path from its newest intact checkpoint, with its saved settings.",
    )
    allow_changes: bool = _f(
        False,
        "With --resume: accept changed data, learning rate, seed or loss options (recorded in run.json and metrics.jsonl).",
    )
    reference_cache: bool = _f(
        True, "Cache reference log-probs on disk and reuse them across runs."
    )
    report_to: list[str] = _f([], "Extra metric sinks: wandb, tensorboard.", choices=REPORT_TO)
    demo_summary: bool = _f(True, "After a run on the demo model, print the before/after summary.")

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [s.strip() for s in self.loss_type.split(",") if s.strip()]
        for f in dataclasses.fields(self):  # the Python API gets the checks YAML and flags get
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}: expected a finite number, got {value!r}")
        positive = ("iters", "batch_size", "grad_accumulation_steps", "max_length", "lora_rank")
        for name in positive:
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("steps_per_report", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.valid_fraction < 1:
            raise ConfigError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(
                f"loss_weights has {len(self.loss_weights)} values but loss_type has "
                f"{len(self.loss_type)} ({', '.join(self.loss_type)}); give one weight per loss type"
            )
        for name in fields_with_choices():  # the one place choices are checked
            value, choices = getattr(self, name), _choices(name)
            for item in value if isinstance(value, list) else [value]:
                if item is not None and item not in choices:
                    raise ConfigError(
                        f"{name} must be one of {', '.join(map(str, choices))}; got {item!r}"
                    )
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        for name in ("max_grad_norm", "weight_decay", "warmup_steps", "steps_per_eval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lora_scale", "q_group_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.val_batches == 0 or self.val_batches < -1:
            raise ConfigError(f"val_batches must be -1 (all) or >= 1, got {self.val_batches}")
        if self.init_adapter and self.start_adapter:
            raise ConfigError(
                "give init_adapter (part of the reference) or start_adapter (not), not both"
            )
        if self.allow_changes and not self.resume:
            raise ConfigError("allow_changes only applies with resume (--resume --allow-changes)")
        from mlx_dpo.loss_options import check_loss_options  # MLX-free: checked before MLX loads

        try:
            check_loss_options(**self.loss_kwargs())
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # --- conversions
    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `losses.dpo_loss` taken from this config."""
        return {name: getattr(self, name) for name in LOSS_FIELDS}

    def data_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `data.load_splits` (how rows are found and read)."""
        names = ("prompt_field", "chosen_field", "rejected_field", "valid_fraction", "seed")
        names += ("data_split", "data_config", "data_dir", "data_revision")
        names += ("skip_invalid_rows", "hh_as_messages", "min_score_margin")
        return {name: getattr(self, name) for name in names}

    def tokenize_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `data.tokenize_rows`."""
        names = ("max_length", "max_prompt_length", "truncation_mode", "chat_template")
        names += ("skip_invalid_rows",)
        return {name: getattr(self, name) for name in names}

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `model.load` besides the model itself."""
        names = ("revision", "quantize", "q_group_size", "compute_dtype", "share_prompt")
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; run `mlx_dpo train --help` for the list"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        coerced = {}
        for name, value in values.items():
            try:
                coerced[name] = coerce(fields[name], value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        return cls(**coerced)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Load a YAML file (keys are field names, dashes or underscores), then apply overrides."""
        values = read_yaml(path)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(values, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


PATH_FIELDS = ("model", "data", "ref_model", "init_adapter", "start_adapter", "chat_template")


def absolute_path(value: str | None) -> str | None:
    """A local path made absolute; a Hub id (or template text, or None) unchanged."""
    if not value or "\n" in value or "{" in value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def with_absolute_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as saved with a run: local paths absolute, so the run's files are found (and
    compared on --resume) from any working directory."""
    return {**settings, **{k: absolute_path(settings.get(k)) for k in PATH_FIELDS if k in settings}}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value at the top level")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _choices(name: str) -> tuple:
    return next(f.metadata["choices"] for f in dataclasses.fields(TrainConfig) if f.name == name)


def fields_with_choices() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if "choices" in f.metadata]
