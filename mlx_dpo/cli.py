"""Command line: `mlx_dpo train | data check | eval | compare | fuse | plot | doctor | bench`.

This module only maps flags onto `TrainConfig` and calls the module that does the work. Every
`train` flag is generated from a `TrainConfig` field (same name, dashes for underscores), with
its help and default taken from there; flags default to None so that a YAML value is never
shadowed by a flag the user did not type. User mistakes exit with status 2 and one line.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import re
import sys
from pathlib import Path

import click

from mlx_dpo import __version__, _blas
from mlx_dpo.config import ConfigError, TrainConfig, coerce, field_kind, read_yaml


class FieldValue(click.ParamType):
    """A flag's text through the same coercion and checks as a YAML value of that field."""

    def __init__(self, f: dataclasses.Field):
        self.field = f
        self.name = field_kind(f)[0].__name__

    def convert(self, value, param, ctx):
        try:
            return coerce(self.field, value)
        except ConfigError as e:
            self.fail(str(e).split(": ", 1)[-1], param, ctx)


def config_options(fields: list[str] | None = None, *, defaults: str = "train", demo=None):
    """Decorator adding one click option per TrainConfig field (or the named subset).

    defaults="train": the help shows TrainConfig's default and, where the bundled demo's
    settings differ, "(demo: ...)". defaults="run" (eval, compare, fuse): every flag left out
    takes the run's setting from its adapter_config.json, and the help says so. `demo`: the
    demo's settings to show instead of demo.yaml's (`iterate` has a demo of its own).
    """
    if demo is None:
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

    values = demo.settings()
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
    kind, is_list, _ = field_kind(f)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    help_text = _help(f, default, run_default, demo)
    if kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
    if is_list:  # choices of list items are checked by TrainConfig, after the split
        help_text += " Repeat the flag or separate values with commas."
        if "choices" in f.metadata:
            help_text += f" Choices: {', '.join(map(str, f.metadata['choices']))}."
        return click.option(
            flag, f.name, multiple=True, default=None, help=help_text, callback=_split(f)
        )
    if "choices" in f.metadata:
        choice = click.Choice([str(c) for c in f.metadata["choices"]])
        return click.option(
            flag, f.name, type=choice, default=None, help=help_text, callback=_cast(f)
        )
    return click.option(flag, f.name, type=FieldValue(f), default=None, help=help_text)


def _cast(f: dataclasses.Field):
    return lambda ctx, param, value: None if value is None else coerce(f, value)


def _split(f: dataclasses.Field):
    def callback(ctx, param, values):
        if not values:
            return None
        try:
            return coerce(f, ",".join(str(v) for v in values))
        except ConfigError as e:
            raise click.BadParameter(str(e).split(": ", 1)[-1]) from None

    return callback


def build_config(config_path: str | None, flags: dict) -> TrainConfig:
    """Flags > --config YAML > (with --resume: the run's saved settings; else the demo's
    defaults when neither names a model) > dataclass defaults."""
    overrides = {k: v for k, v in flags.items() if v is not None}
    values = read_yaml(config_path) if config_path else {}
    demo_values = {}
    named = ("model", "data")  # the demo's settings apply only to the demo's model and data
    if all(overrides.get(k) is None and values.get(k) is None for k in named):
        from mlx_dpo import demo

        demo_values = demo.settings()
    resume = overrides.get("resume", values.get("resume", False))
    path = overrides.get("adapter_path", values.get("adapter_path"))
    if resume:
        path = path or demo_values.get("adapter_path") or TrainConfig.adapter_path
        saved = _saved_settings(Path(path))
        base = saved or demo_values
    else:
        base = demo_values
        if demo_values and path is None:  # rerunning the demo starts a new run directory
            base = {**demo_values, "adapter_path": demo.fresh_run_dir(demo_values["adapter_path"])}
    return TrainConfig.from_dict({**base, **values, **overrides}, source=config_path or "flags")


def _saved_settings(path: Path) -> dict:
    """The settings a run in `path` was started with (empty when there is no run to read)."""
    from mlx_dpo.rundir import RunDir

    run = RunDir(path)
    if not run.is_ours():
        return {}
    settings = run.read_identity().get("settings", {})
    keep = {f.name for f in dataclasses.fields(TrainConfig)} - {"adapter_path", "resume"}
    return {k: v for k, v in settings.items() if k in keep and k != "allow_changes"}


WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def user_errors(fn):
    """Turn the errors a user can fix into one line and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mlx_dpo.errors import USER_ERRORS

        try:
            return fn(*args, **kwargs)
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            # a full or read-only disk is the machine's state, not a bug: one line
            click.echo(f"Error: could not write {e.filename or 'a file'}: {e.strerror}", err=True)
            sys.exit(2)
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
    from mlx_dpo.stop import Interrupted
    from mlx_dpo.trainer import NonFiniteLoss

    _say_blas()
    try:
        run_training(cfg, log=click.echo)
    except NonFiniteLoss as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)


DATA_FIELDS = [
    "model",
    "revision",
    "data",
    "data_split",
    "data_config",
    "data_dir",
    "data_revision",
    "prompt_field",
    "chosen_field",
    "rejected_field",
    "skip_invalid_rows",
    "hh_as_messages",
    "min_score_margin",
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
    """Validate a dataset without training: the format detected, rows skipped and why,
    token-length statistics, and 3 sample pairs with the trained tokens marked.

    Without --model the rows are tokenized with the bundled demo model's tokenizer (a ChatML
    template) and the documented defaults (--max-length 1024); pass --model to see your
    model's template and token counts.
    """
    from mlx_dpo import demo
    from mlx_dpo.data_sources import load_splits

    cfg = build_config(config_path, flags)  # the demo's settings only when no model or data
    given_model = cfg.model is not None
    cfg = demo.with_defaults(cfg)
    if not given_model:
        click.echo(
            "tokenizer: the bundled demo model's (ChatML template), as no --model was given; "
            "pass --model to check with your model's tokenizer and chat template"
        )
    click.echo(
        f"limits: max_length={cfg.max_length}, max_prompt_length={cfg.max_prompt_length}, "
        f"truncation_mode={cfg.truncation_mode}"
    )
    splits = load_splits(cfg.data, **cfg.data_kwargs())  # bad data fails before MLX loads
    click.echo(splits.format_line())
    from mlx_dpo import data
    from mlx_dpo.data_report import format_samples, skipped_line
    from mlx_dpo.model import load_tokenizer_only

    tokenizer = load_tokenizer_only(cfg.model, cfg.revision)
    pairs, stats = {}, {}
    for name, rows in splits.items():
        pairs[name], stats[name] = data.tokenize_rows(rows, tokenizer, **cfg.tokenize_kwargs())
    skipped = splits.skipped + [p for st in stats.values() for p in st.skipped]
    if line := skipped_line(skipped):
        click.echo(line)
    click.echo(data.dataset_stats(pairs, stats))
    click.echo("")
    click.echo(format_samples(pairs.get("train") or next(iter(pairs.values()), []), tokenizer))


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
