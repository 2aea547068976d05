"""After-training commands: `eval`, `compare`, `fuse` and `plot`, and `iterate`; cli.py adds COMMANDS to the
`mlx_dpo` group. Like cli.py this only maps flags onto settings and calls the module that does
the work (evaluate.py, compare.py, export.py, plot.py).

Settings shared with `train` use its flags (generated from TrainConfig). Their defaults come
from the run's adapter_config.json, so `mlx_dpo eval --adapter-path RUN` evaluates with the
run's model, data, tokenization and loss unless a flag says otherwise.
"""

from __future__ import annotations

import json

import click

from mlx_dpo.config import LOSS_FIELDS

COMMANDS: list = []

# cli.py imports this module at its end, after defining these helpers; COMMANDS exists first so
# that importing this module before cli.py also works (see the end of this file).
from mlx_dpo.cli import DATA_FIELDS, config_options, main, user_errors  # noqa: E402

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


def _adapter_option(required: bool, help: str):
    return click.option(
        "--adapter-path", type=click.Path(file_okay=False), required=required, help=help
    )


def _model_option(fn):
    return click.option(
        "--model",
        help="Hugging Face id or local path of the base model [default: the run's model].",
    )(fn)


def _data_option(fn):
    return click.option(
        "--data",
        help="Directory, file (.jsonl/.json/.parquet) or Hub dataset id [default: the run's data].",
    )(fn)


@click.command("eval")
@_adapter_option(False, "Adapter directory of a run (default: evaluate the base model alone).")
@click.option(
    "--split", type=SPLIT, help="Split to evaluate [default: valid, else test, else train]."
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Write per-pair scores here (JSON lines): policy and reference log-probs, rewards, loss.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@_model_option
@_data_option
@config_options(EVAL_FIELDS, defaults="run")
@user_errors
def eval_command(adapter_path, split, output, as_json, **flags):
    """DPO metrics of adapters on a data split (loss, reward accuracy and margin, log-probs).

    Flags left out take the run's settings from ADAPTER_PATH/adapter_config.json.
    """
    from mlx_dpo.saved_config import config_for

    cfg = config_for(adapter_path, flags)  # settings checked before MLX is imported
    from mlx_dpo.evaluate import evaluate_adapters, format_metrics, write_scores

    log = (lambda *_: None) if as_json else click.echo
    result = evaluate_adapters(cfg, adapter_path, split=split, log=log)
    if output:
        write_scores(result.scores, output)
        log(f"wrote {len(result.scores)} pair scores to {output}")
    if as_json:
        click.echo(
            json.dumps({"split": result.split, "pairs": len(result.scores), **result.metrics})
        )
    else:
        click.echo(format_metrics(result))


@click.command()
@_adapter_option(True, "Adapter directory of a run.")
@click.option(
    "--prompts",
    type=click.Path(dir_okay=False),
    help="Prompts: a text file (one a line) or JSON lines (strings, message lists or {prompt}).",
)
@click.option(
    "--split", type=SPLIT, help="With --data: the split whose prompts to use [default: valid]."
)
@click.option(
    "--num-prompts",
    type=click.IntRange(min=1),
    help="Use the first N prompts [default: all of --prompts, 8 of --data].",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Tokens to generate per answer.",
)
@click.option(
    "--temp",
    type=click.FloatRange(min=0),
    default=0.7,
    show_default=True,
    help="Sampling temperature (0: greedy).",
)
@click.option(
    "--top-p",
    type=click.FloatRange(0, 1),
    default=1.0,
    show_default=True,
    help="Nucleus sampling threshold (1: off).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="mx.random.seed before every generation."
)
@click.option(
    "--no-chat-template",
    is_flag=True,
    help="Send --prompts text as it is, without the chat template.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Also write the answers to a .jsonl or .md file.",
)
@_model_option
@_data_option
@config_options(COMPARE_FIELDS, defaults="run")
@user_errors
def compare(
    adapter_path,
    prompts,
    split,
    num_prompts,
    max_tokens,
    temp,
    top_p,
    seed,
    no_chat_template,
    output,
    **flags,
):
    """Generate from the base (adapters off) and the tuned model, same prompts and seeds.

    Flags left out take the run's settings from ADAPTER_PATH/adapter_config.json.
    """
    from mlx_dpo.config import ConfigError
    from mlx_dpo.saved_config import config_for

    if prompts and flags.get("data"):
        raise ConfigError("give --prompts or --data, not both")
    cfg = config_for(adapter_path, flags)  # settings checked before MLX is imported
    if not prompts and not cfg.data:
        raise ConfigError("--prompts or --data is required (the adapter's config names no data)")
    from mlx_dpo import compare as lib
    from mlx_dpo import model as model_lib

    loaded = model_lib.load(cfg.model, **cfg.model_kwargs())
    tokenizer = loaded.tokenizer
    if prompts:
        todo = lib.prompts_from_file(
            tokenizer,
            prompts,
            prompt_field=cfg.prompt_field,
            use_template=not no_chat_template,
            chat_template=cfg.chat_template,
        )
    else:
        todo = lib.prompts_from_data(cfg, tokenizer, split, log=click.echo)
    todo = todo[: num_prompts or (len(todo) if prompts else 8)]
    model_lib.load_adapter_dir(loaded.model, adapter_path)
    results = lib.generate_both(
        loaded.model,
        tokenizer,
        todo,
        max_tokens=max_tokens,
        temp=temp,
        top_p=top_p,
        seed=seed,
        on_result=lambda i, r: click.echo("\n" + lib.format_one(i, r)),
    )
    if output:
        settings = {
            "model": cfg.model,
            "adapter_path": str(adapter_path),
            "temp": temp,
            "top_p": top_p,
            "seed": seed,
            "max_tokens": max_tokens,
        }
        lib.write_output(results, output, settings)
        click.echo(f"\nwrote {len(results)} comparisons to {output}")


@click.command()
@_adapter_option(True, "Adapter directory of a run.")
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    required=True,
    help="Directory for the fused model (new or empty).",
)
@click.option(
    "--dequantize",
    is_flag=True,
    help="Write float weights (a quantized base is dequantized); also a Hugging Face checkpoint for standard architectures.",
)
@click.option("--upload-repo", help="Upload the fused model to this Hugging Face repo (org/name).")
@_model_option
@config_options(["revision", "quantize", "q_group_size"], defaults="run")
@user_errors
def fuse(adapter_path, output, dequantize, upload_repo, **flags):
    """Fuse adapters into the base weights: a standalone model that mlx_lm.load reads.

    Flags left out take the run's settings from ADAPTER_PATH/adapter_config.json.
    """
    from mlx_dpo.config import ConfigError
    from mlx_dpo.saved_config import config_for

    cfg = config_for(adapter_path, flags)  # settings checked before MLX is imported
    if cfg.model is None:
        raise ConfigError("--model is required (the adapter's config names none)")
    from mlx_dpo.export import fuse as fuse_model

    fuse_model(
        cfg.model,
        adapter_path,
        output,
        revision=cfg.revision,
        quantize=cfg.quantize,
        q_group_size=cfg.q_group_size,
        dequantize=dequantize,
        upload_repo=upload_repo,
        log=click.echo,
    )


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--output", type=click.Path(dir_okay=False), help="PNG file [default: RUN_DIR/metrics.png]."
)
@user_errors
def plot(run_dir, output):
    """Plot loss, reward accuracy, margins and rewards of a run (train and validation)."""
    from mlx_dpo.config import ConfigError
    from mlx_dpo.iterate_report import is_iterate_run, plot_rounds
    from mlx_dpo.plot import plot_run

    path = (plot_rounds if is_iterate_run(run_dir) else plot_run)(run_dir, output)
    if path is None:
        raise ConfigError(
            "plotting needs matplotlib: `pip install matplotlib` "
            '(or `pip install ".[plot]"` in a checkout of mlx_dpo)'
        )
    click.echo(f"wrote {path}")


def _iterate_options(fn):
    from mlx_dpo.iterate_config import cli_options

    for flag, kind, help_text in reversed(cli_options()):
        fn = click.option(flag, type=kind, default=None, help=help_text)(fn)
    return fn


def _iterate_train_options(fn):
    from mlx_dpo.iterate_config import DEMO_TRAIN, TRAIN_FIELDS

    return config_options(TRAIN_FIELDS, demo=DEMO_TRAIN)(fn)


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="YAML file of settings (iterate's and train's names as keys); flags override it.",
)
@_iterate_options
@_iterate_train_options
@user_errors
def iterate(config_path, **flags):
    """On-policy DPO from prompts and a reward: each round samples answers from the current
    model, scores them, pairs best with worst and trains on the pairs (every `train` option
    applies to each round). With no arguments: the bundled demo (under a minute on 2 cores).
    """
    import sys

    from mlx_dpo.iterate_config import resolve

    icfg, cfg, state = resolve(
        flags, config_path
    )  # every setting is checked before MLX is imported
    from mlx_dpo.cli import _say_blas
    from mlx_dpo.iterate import run_iterate
    from mlx_dpo.stop import Interrupted
    from mlx_dpo.trainer import NonFiniteLoss

    _say_blas()
    again = f"mlx_dpo iterate --adapter-path {cfg.adapter_path} --resume"
    try:
        run_iterate(icfg, cfg, state, log=click.echo)
    except NonFiniteLoss as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except Interrupted as e:
        click.echo(f"{e}\ncontinue the iterate run with: {again}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo(f"stopped; the samples saved so far are kept. Continue with: {again}", err=True)
        sys.exit(130)


COMMANDS += [eval_command, compare, fuse, plot, iterate]
for _command in COMMANDS:  # when this module was imported before cli.py finished
    main.add_command(_command)
