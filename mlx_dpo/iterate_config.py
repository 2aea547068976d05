"""Settings of `mlx_dpo iterate` (MLX-free, so bad flags fail before anything heavy loads).

An iterate run has two sets of settings: `IterateConfig` (prompts, reward, sampling, pairing,
rounds) and the `TrainConfig` every round trains with (every `train` option but the ones that
name the data, which each round writes itself). Precedence: flags > (with --resume: the run's
saved settings) > the demo's settings (no --model and no --prompts) > defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mlx_dpo.config import ConfigError, TrainConfig
from mlx_dpo.errors import RunError

STATE = "iterate.json"
# TrainConfig fields iterate sets itself (each round's data and adapters), or that do not apply
MANAGED = (
    "data",
    "data_split",
    "data_config",
    "data_dir",
    "data_revision",
    "chosen_field",
    "rejected_field",
    "skip_invalid_rows",
    "hh_as_messages",
    "min_score_margin",
    "init_adapter",
    "start_adapter",
    "allow_changes",
    "demo_summary",
)
TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in MANAGED]
# Settings a --resume may change: how far to go and how to report
FREE = {"rounds", "target", "resume", "adapter_path", "steps_per_report", "steps_per_eval"}
FREE |= {"val_batches", "save_every", "reference_cache", "report_to"}


@dataclass
class IterateConfig:
    prompts: str | None = None
    eval_prompts: str | None = None  # held-out prompts scored before and after each round
    num_prompts: int | None = None
    reward: str | None = None
    judge_model: str | None = None
    judge_template: str | None = None
    rounds: int = 3
    samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    min_margin: float = 0.0
    target: float | None = None
    reference: str = "start"  # or "previous"
    sample_batch: int = 16  # prompts per generation and reward call

    def __post_init__(self):
        for name, kind in _NUMBERS.items():  # YAML (--config) values come as they were typed
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                try:
                    setattr(self, name, kind(float(value)) if kind is int else float(value))
                except (TypeError, ValueError):
                    raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if self.reward and self.judge_model:
            raise ConfigError("give --reward or --judge-model, not both")
        if self.judge_template and not self.judge_model:
            raise ConfigError("--judge-template applies only with --judge-model")
        if self.samples < 2:
            raise ConfigError(
                f"--samples must be at least 2 (a pair needs two), got {self.samples}"
            )
        for name in ("rounds", "max_tokens", "sample_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.reference not in ("start", "previous"):
            raise ConfigError(f"--reference must be start or previous, got {self.reference!r}")


_NUMBERS = {"num_prompts": int, "rounds": int, "samples": int, "max_tokens": int}
_NUMBERS |= {"sample_batch": int, "temperature": float, "top_p": float, "min_margin": float}
_NUMBERS |= {"target": float}

# The demo: 128 of the demo's training prompts, its held-out prompts, its rule as the reward.
DEMO_ITERATE = {"rounds": 3, "samples": 4, "temperature": 1.0, "max_tokens": 24, "target": 1.0}
DEMO_ITERATE |= {"num_prompts": 128, "reward": "mlx_dpo.rewards:demo_reward"}
DEMO_TRAIN = {"adapter_path": "runs/iterate", "epochs": 1.5, "batch_size": 4, "max_length": 64}
DEMO_TRAIN |= {"learning_rate": 5e-5, "lr_schedule": "constant", "beta": 0.1, "num_layers": -1}
DEMO_TRAIN |= {"lora_rank": 8, "lora_scale": 20.0, "steps_per_report": 10, "steps_per_eval": 0}
DEMO_TRAIN |= {"save_every": 40, "valid_fraction": 0.0}


def is_demo_reward(spec: str | None) -> bool:
    return spec == DEMO_ITERATE["reward"]


def resolve(flags: dict, config_path: str | None = None) -> tuple[IterateConfig, TrainConfig, dict]:
    """(IterateConfig, TrainConfig, saved state or {}) from the flags given (None = not given)
    over the --config YAML (keys: iterate's and train's setting names)."""
    given = {k: v for k, v in flags.items() if v is not None}
    if config_path:
        given = {**_read_config(config_path), **given}
    it_names = {f.name for f in dataclasses.fields(IterateConfig)}
    path = given.get("adapter_path")
    demo = not given.get("model") and not given.get("prompts")
    if given.get("resume"):
        path = path or DEMO_TRAIN["adapter_path"]
        state = read_state(Path(path))
        base = {**state["settings"]["iterate"], **state["settings"]["train"]}
    else:
        state = {}
        base = {**DEMO_ITERATE, **DEMO_TRAIN} if demo else {}
        if demo:
            from mlx_dpo import demo as demo_pkg

            base |= {
                "model": str(demo_pkg.MODEL_DIR),
                "prompts": str(demo_pkg.DATA_DIR / "train.jsonl"),
            }
            base["eval_prompts"] = str(demo_pkg.DATA_DIR / "valid.jsonl")
            if path is None:
                path = demo_pkg.fresh_run_dir(DEMO_TRAIN["adapter_path"])
    values = {**base, **given, "adapter_path": path or "runs/iterate"}
    if not values.get("model"):  # prompts of one's own for the demo model
        from mlx_dpo import demo as demo_pkg

        values["model"] = str(demo_pkg.MODEL_DIR)
    if given.get("judge_model") and "reward" not in given:  # the demo's or the saved reward
        values.pop("reward", None)
    icfg = IterateConfig(**{k: v for k, v in values.items() if k in it_names})
    if not icfg.prompts:
        raise ConfigError("--prompts is required with --model (a .jsonl/.json/.parquet file)")
    if not icfg.reward and not icfg.judge_model:
        raise ConfigError("--reward module:function or --judge-model is required")
    train = {k: v for k, v in values.items() if k in TRAIN_FIELDS}
    cfg = TrainConfig.from_dict(train, source="flags")
    if state:
        check_resume(state, icfg, cfg)
    return icfg, cfg, state


def _read_config(path: str) -> dict:
    from mlx_dpo.config import read_yaml

    values = read_yaml(path)
    known = {f.name for f in dataclasses.fields(IterateConfig)} | set(TRAIN_FIELDS)
    if unknown := sorted(set(values) - known):
        raise ConfigError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; see `mlx_dpo iterate --help`"
        )
    return values


def settings(icfg: IterateConfig, cfg: TrainConfig) -> dict:
    """What the run saves and a --resume compares (local paths absolute)."""
    it = dataclasses.asdict(icfg)
    for name in ("prompts", "eval_prompts", "judge_template"):
        if it[name] and Path(it[name]).exists():
            it[name] = str(Path(it[name]).resolve())
    train = {k: v for k, v in cfg.to_dict().items() if k in TRAIN_FIELDS}
    if train.get("model") and Path(train["model"]).exists():
        train["model"] = str(Path(train["model"]).resolve())
    return {"iterate": it, "train": train}


def check_resume(state: dict, icfg: IterateConfig, cfg: TrainConfig) -> None:
    saved, now = state["settings"], settings(icfg, cfg)
    diffs = []
    for part in ("iterate", "train"):
        for name in sorted(set(saved[part]) | set(now[part])):
            old, new = saved[part].get(name), now[part].get(name)
            if name not in FREE and old != new:
                diffs.append(f"{name}: saved {old!r}, given {new!r}")
    if diffs:
        raise RunError(
            f"--resume: {cfg.adapter_path} was started with other settings ({'; '.join(diffs)}); "
            "nothing was changed. Resume without them, or start a new run in another --adapter-path"
        )


def read_state(path: Path) -> dict:
    import json

    file = path / STATE
    if not file.is_file():
        raise RunError(
            f"--resume: {path} holds no mlx_dpo iterate run (no {STATE}); start one without --resume"
        )
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{file}: unreadable ({e}); the run cannot be resumed") from None


def cli_options() -> list[tuple]:
    """(flag, click type, help) of iterate's own flags (the training flags come from TrainConfig)."""
    import click

    return _prompt_and_reward_options(click) + _round_options(click)


def _demo(name: str) -> str:
    return f" (demo: {DEMO_ITERATE[name]})" if name in DEMO_ITERATE else ""


def _prompt_and_reward_options(click) -> list[tuple]:
    """Where the prompts come from and how the answers are scored."""
    return [
        (
            "--prompts",
            click.Path(dir_okay=False),
            "Prompts: .jsonl/.json/.parquet rows with a prompt (text or messages); other fields go to the reward (demo: the demo's training prompts).",
        ),
        (
            "--eval-prompts",
            click.Path(dir_okay=False),
            "Held-out prompts, sampled and scored before training and after each round (demo: the demo's validation prompts).",
        ),
        (
            "--num-prompts",
            click.IntRange(min=1),
            "Use the first N prompts [default: all]" + _demo("num_prompts") + ".",
        ),
        (
            "--reward",
            str,
            "Reward function module:function, importable from the working directory: (prompts, completions, **row_fields) -> list[float], as in TRL"
            + _demo("reward")
            + ".",
        ),
        (
            "--judge-model",
            str,
            "Score with this mlx-lm model instead: the first number of its greedy reply to --judge-template.",
        ),
        (
            "--judge-template",
            click.Path(dir_okay=False),
            "File with the judge's prompt, with {prompt} and {completion} placeholders [default: a 0-10 rating prompt].",
        ),
    ]


def _round_options(click) -> list[tuple]:
    """How each round samples, pairs and picks its reference."""
    return [
        (
            "--rounds",
            click.IntRange(min=1),
            "Rounds of sample -> score -> pair -> train [default: 3].",
        ),
        ("--samples", click.IntRange(min=2), "Answers sampled per prompt and round [default: 4]."),
        ("--temperature", click.FloatRange(min=0), "Sampling temperature [default: 1.0]."),
        ("--top-p", click.FloatRange(0, 1), "Nucleus sampling threshold (1: off) [default: 1.0]."),
        (
            "--max-tokens",
            click.IntRange(min=1),
            "Tokens per sampled answer [default: 128]" + _demo("max_tokens") + ".",
        ),
        (
            "--min-margin",
            click.FloatRange(min=0),
            "Keep a prompt's best-vs-worst pair only when the reward margin is at least this (ties are always dropped) [default: 0].",
        ),
        (
            "--target",
            float,
            "Report the share of prompts whose best sample's reward reaches this"
            + _demo("target")
            + ".",
        ),
        (
            "--reference",
            click.Choice(["start", "previous"]),
            "Reference of each round: the model at the start of the run, or the previous round's policy [default: start].",
        ),
        (
            "--sample-batch",
            click.IntRange(min=1),
            "Prompts per generation batch and reward call [default: 16].",
        ),
    ]
