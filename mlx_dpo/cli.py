"""Command line: `mlx_dpo train | data check | eval | compare | fuse | plot | iterate | doctor`.

Every command is here, and each only maps flags onto settings and calls the module that does
the work (run, data, evaluate, compare, export, plot, iterate). The flags themselves (generated
from TrainConfig, coerced and checked like YAML values) are in flags.py. Commands that read a
run (eval, compare, fuse) take their defaults from its adapter_config.json. User mistakes exit
with status 2 and one line; heavy modules are imported only once the flags are checked.
"""

from __future__ import annotations

import json
import sys

import click

from mlx_dpo import __version__, _blas
from mlx_dpo.flags import (
    COMPARE_FIELDS,
    DATA_FIELDS,
    EVAL_FIELDS,
    SPLIT,
    adapter_option,
    build_config,
    config_options,
    data_option,
    iterate_options,
    iterate_train_options,
    model_option,
    user_errors,
)


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
    from mlx_dpo.stop import Interrupted
    from mlx_dpo.trainer import NonFiniteLoss
    from mlx_dpo.training import run_training

    _say_blas()
    try:
        run_training(cfg, log=click.echo)
    except NonFiniteLoss as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)


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


@main.command("eval")
@adapter_option(False, "Adapter directory of a run (default: evaluate the base model alone).")
@click.option(
    "--split", type=SPLIT, help="Split to evaluate [default: valid, else test, else train]."
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Write per-pair scores here (JSON lines): policy and reference log-probs, rewards, loss.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@model_option
@data_option
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


@main.command()
@adapter_option(True, "Adapter directory of a run.")
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
@model_option
@data_option
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
    todo = _compare_prompts(cfg, tokenizer, prompts, split, not no_chat_template, num_prompts)
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


def _compare_prompts(cfg, tokenizer, prompts, split, use_template, num_prompts) -> list:
    """compare's prompts: from --prompts (all by default), or the first 8 of the run's data."""
    from mlx_dpo import compare as lib

    if prompts:
        todo = lib.prompts_from_file(
            tokenizer,
            prompts,
            prompt_field=cfg.prompt_field,
            use_template=use_template,
            chat_template=cfg.chat_template,
        )
    else:
        todo = lib.prompts_from_data(cfg, tokenizer, split, log=click.echo)
    return todo[: num_prompts or (len(todo) if prompts else 8)]


@main.command()
@adapter_option(True, "Adapter directory of a run.")
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
@model_option
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


@main.command()
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


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="YAML file of settings (iterate's and train's names as keys); flags override it.",
)
@iterate_options
@iterate_train_options
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


def _say_blas() -> None:
    state = _blas.preload()
    if sys.platform.startswith("linux"):
        click.echo(f"blas: {state.reason}", err=not state.path)


if __name__ == "__main__":
    main()
