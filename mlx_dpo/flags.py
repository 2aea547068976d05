"""The flag layer of the CLI (no commands here; they are all in cli.py).

Every `train` flag is generated from a `TrainConfig` field (same name, dashes for underscores),
with its help and default taken from there; a flag's text goes through the same coercion and
checks as a YAML value (`FieldValue`). Flags default to None so that a YAML value is never
shadowed by a flag the user did not type. `build_config` applies the precedence, and
`user_errors` turns the errors a user can fix into one line and exit status 2. MLX-free, so a
bad flag is reported before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import re
import sys
from pathlib import Path

import click

from mlx_dpo.config import LOSS_FIELDS, ConfigError, TrainConfig, read_yaml
from mlx_dpo.config_values import coerce, field_kind


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


# --model and --data get their own help: here they default to the run's, not the demo's.
MODEL_FIELDS = ["revision", "quantize", "q_group_size", "compute_dtype"]
DATA_ONLY = [f for f in DATA_FIELDS if f not in ("model", "data", "seed")]
EVAL_FIELDS = (
    DATA_ONLY
    + MODEL_FIELDS
    + [
        "seed",
        "batch_size",
        "init_adapter",
        "ref_model",
        "reference_cache",
        *LOSS_FIELDS,
    ]
)
COMPARE_FIELDS = DATA_ONLY + MODEL_FIELDS
SPLIT = click.Choice(["train", "valid", "test"])


def adapter_option(required: bool, help: str):
    return click.option(
        "--adapter-path", type=click.Path(file_okay=False), required=required, help=help
    )


def model_option(fn):
    return click.option(
        "--model",
        help="Hugging Face id or local path of the base model [default: the run's model].",
    )(fn)


def data_option(fn):
    return click.option(
        "--data",
        help="Directory, file (.jsonl/.json/.parquet) or Hub dataset id [default: the run's data].",
    )(fn)


def iterate_options(fn):
    from mlx_dpo.iterate_config import cli_options

    for flag, kind, help_text in reversed(cli_options()):
        fn = click.option(flag, type=kind, default=None, help=help_text)(fn)
    return fn


def iterate_train_options(fn):
    from mlx_dpo.iterate_config import DEMO_TRAIN, TRAIN_FIELDS

    return config_options(TRAIN_FIELDS, demo=DEMO_TRAIN)(fn)
