"""Command line: `mlx_dpo train | data check | eval | compare | fuse | plot | doctor | bench`.

This module only maps flags onto `TrainConfig` and calls the module that does the work. Every
`train` flag is generated from a `TrainConfig` field (same name, dashes for underscores), with
its help and default taken from there; flags default to None so that a YAML value is never
shadowed by a flag the user did not type. User mistakes exit with status 2 and one line.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from pathlib import Path

import click

from mlx_dpo import __version__, _blas
from mlx_dpo.config import TrainConfig, read_yaml

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _field_type(annotation: str) -> tuple[type, bool]:
    """(element type, is_list) of a TrainConfig annotation such as 'list[float] | None'."""
    base = annotation.replace(" | None", "").strip()
    if base.startswith("list["):
        return _TYPES[base[5:-1]], True
    return _TYPES[base], False


def config_options(fields: list[str] | None = None, *, defaults: str = "train"):
    """Decorator adding one click option per TrainConfig field (or the named subset).

    defaults="train": the help shows TrainConfig's default and, where the bundled demo's
    settings differ, "(demo: ...)". defaults="run" (eval, compare, fuse): every flag left out
    takes the run's setting from its adapter_config.json, and the help says so.
    """
    demo = _demo_values() if defaults == "train" else {}

    def decorate(fn):
        for f in reversed(dataclasses.fields(TrainConfig)):
            if fields is not None and f.name not in fields:
                continue
            fn = _option(f, run_default=defaults == "run", demo=demo.get(f.name))(fn)
        return fn

    return decorate


@functools.cache
def _demo_values() -> dict:
    """demo.yaml's settings (the demo's run directory named as `train` picks it)."""
    from mlx_dpo import demo

    values = read_yaml(Path(demo.__file__).parent / "demo.yaml")
    if "adapter_path" in values:
        values["adapter_path"] = f"{values['adapter_path']}, or -2, -3, ... when taken"
    return values


def _help(f: dataclasses.Field, default, run_default: bool, demo) -> str:
    text = f.metadata["help"]
    if run_default:
        # "(default: ...)" in a field's help describes train; here the run's value replaces it.
        return re.sub(r" ?\(default: [^)]*\)", "", text) + " [default: the run's]"
    if default not in (None, []):
        text += f" [default: {default}]"
    if demo is not None and demo != default:
        text += f" (demo: {demo})"
    return text


def _option(f: dataclasses.Field, *, run_default: bool = False, demo=None):
    flag = "--" + f.name.replace("_", "-")
    kind, is_list = _field_type(f.type)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    help_text = _help(f, default, run_default, demo)
    if kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
    if "choices" in f.metadata:
        choice = click.Choice([str(c) for c in f.metadata["choices"]])
        return click.option(
            flag, f.name, type=choice, default=None, help=help_text, callback=_cast(kind)
        )
    if is_list:
        help_text += " Repeat the flag or separate values with commas."
        return click.option(
            flag, f.name, multiple=True, default=None, help=help_text, callback=_split(kind)
        )
    return click.option(flag, f.name, type=kind, default=None, help=help_text)


def _cast(kind):
    return lambda ctx, param, value: None if value is None else kind(value)


def _split(kind):
    def callback(ctx, param, values):
        if not values:
            return None
        items = [v.strip() for value in values for v in str(value).split(",") if v.strip()]
        try:
            return [kind(v) for v in items]
        except ValueError:
            raise click.BadParameter(
                f"expected {kind.__name__} values, got {', '.join(items)}"
            ) from None

    return callback


def build_config(config_path: str | None, flags: dict) -> TrainConfig:
    """Flags > --config YAML > (demo defaults when neither names a model) > dataclass defaults."""
    overrides = {k: v for k, v in flags.items() if v is not None}
    values = read_yaml(config_path) if config_path else {}
    if overrides.get("model") is None and values.get("model") is None:
        from mlx_dpo import demo

        demo_values = read_yaml(Path(demo.__file__).parent / "demo.yaml")
        if "adapter_path" not in values:  # rerunning the demo starts a new run directory
            demo_values["adapter_path"] = _fresh_dir(Path(demo_values["adapter_path"]))
        values = {**demo_values, **values}
    return TrainConfig.from_dict({**values, **overrides}, source=config_path or "flags")


def _fresh_dir(path: Path) -> str:
    """`path`, or `path-2`, `path-3`, ... the first that holds no run yet."""
    candidate, n = path, 1
    while (candidate / "adapters.safetensors").exists() or (candidate / "checkpoints").exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return str(candidate)


def user_errors(fn):
    """Turn the errors a user can fix into one line and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mlx_dpo.errors import USER_ERRORS

        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            click.echo(f"Error: {lines[0]}", err=True)
            for line in lines[1:11]:
                click.echo(f"  {line}", err=True)
            if len(lines) > 11:
                click.echo(f"  ... and {len(lines) - 11} more", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mlx_dpo")
def main():
    """Preference tuning (DPO and its family of losses) of LoRA adapters on mlx-lm models."""


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="YAML file of settings (field names as keys); flags override it.",
)
@config_options()
@user_errors
def train(config_path, **flags):
    """Train adapters. With no --model and --data: the bundled demo (a tiny 4-bit model, under a minute on 2 CPU cores)."""
    cfg = build_config(config_path, flags)  # every setting is checked before MLX is imported
    from mlx_dpo.run import run_training
    from mlx_dpo.trainer import Interrupted, NonFiniteLoss

    _say_blas()
    try:
        run_training(cfg, log=click.echo)
    except NonFiniteLoss as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(130)


DATA_FIELDS = [
    "model",
    "revision",
    "data",
    "data_split",
    "data_config",
    "data_revision",
    "prompt_field",
    "chosen_field",
    "rejected_field",
    "valid_fraction",
    "chat_template",
    "max_length",
    "max_prompt_length",
    "truncation_mode",
    "seed",
]


@main.group("data")
def data_group():
    """Inspect preference data."""


@data_group.command("check")
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of settings."
)
@config_options(DATA_FIELDS)
@user_errors
def data_check(config_path, **flags):
    """Validate a dataset without training and print its statistics."""
    from mlx_dpo import demo
    from mlx_dpo.data_sources import load_splits

    cfg = build_config(config_path, flags)
    cfg = dataclasses.replace(
        cfg, model=cfg.model or str(demo.MODEL_DIR), data=cfg.data or str(demo.DATA_DIR)
    )
    splits = load_splits(cfg.data, **cfg.data_kwargs())  # bad data fails before MLX loads
    from mlx_dpo import data
    from mlx_dpo.model import load_tokenizer_only

    tokenizer = load_tokenizer_only(cfg.model, cfg.revision)
    pairs, stats = {}, {}
    for name, rows in splits.items():
        pairs[name], stats[name] = data.tokenize_rows(rows, tokenizer, **cfg.tokenize_kwargs())
    click.echo(data.dataset_stats(pairs, stats))


@main.command()
def doctor():
    """Report the MLX backend, memory, BLAS, versions and Hub settings."""
    from mlx_dpo.doctor import report

    click.echo(report())


def _add_commands() -> None:
    from mlx_dpo.commands import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_add_commands()


def _say_blas() -> None:
    state = _blas.preload()
    if sys.platform.startswith("linux"):
        click.echo(f"blas: {state.reason}", err=not state.path)


if __name__ == "__main__":
    main()
