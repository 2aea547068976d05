"""Fuse trained adapters into the base weights: a standalone model directory, no adapters needed.

This is `mlx_lm.fuse` with the loading our runs need: the base is loaded the way training saw
it (Hub or local, `quantize` at load time as in the run's adapter_config.json), and
`compute_dtype="native"` keeps mlx-lm's stock QuantizedLinear classes so that
`LoRALinear.fuse` / `DoRALinear.fuse` re-quantize with each layer's own group size and bits.

- Without `dequantize`, a quantized base stays quantized: each adapted layer is dequantized,
  gets `scale * B^T A^T` added, and is quantized again with its own settings. Re-quantizing
  rounds the update, so the fused logits differ from base + adapter by the quantization error
  (tests/test_export.py measures it). A float base fuses exactly (up to float rounding).
- With `dequantize`, every layer is written in float: logits equal base + adapter, and for
  standard architectures (Llama, Qwen2, Mistral, ...) the directory is also a Hugging Face
  checkpoint that `transformers` loads, since mlx-lm keeps their parameter names.
"""

from __future__ import annotations

import glob
import json
import shutil
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_dpo import model as model_lib
from mlx_dpo.config import LOSS_FIELDS, ConfigError, TrainConfig
from mlx_dpo.progress import Progress


def fuse(
    model: str,
    adapter_path: str | Path,
    output: str | Path,
    *,
    revision: str | None = None,
    quantize: int | None = None,
    q_group_size: int = 64,
    dequantize: bool = False,
    upload_repo: str | None = None,
    log=print,
) -> Path:
    """Write base `model` + the adapters in `adapter_path` to `output` in mlx-lm's format.

    `quantize`/`q_group_size` must be what the adapters were trained with (the run's
    adapter_config.json has them). Returns `output`. Raises ModelError for an adapter that
    does not fit the model, ConfigError for an `output` that already holds files.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"--output {output}: exists and is not empty; choose a new directory")
    loaded = model_lib.load(
        model,
        revision=revision,
        quantize=quantize,
        q_group_size=q_group_size,
        compute_dtype="native",
    )
    net = loaded.model
    model_lib.load_adapter_dir(net, adapter_path)
    n_fused = _fuse_layers(net, adapter_path, dequantize)
    config = dict(loaded.config)
    if dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(net)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif "quantization" not in config and (q := quantization_config(net)) is not None:
        config["quantization"] = q  # quantized at load time (--quantize): record how
    log(f"fused {n_fused} adapter layers from {adapter_path} into {loaded.path}")
    card = model_card(model, adapter_path, dequantize=dequantize)
    save(output, net, loaded.tokenizer, config, loaded.path, card=card)
    log(
        f"wrote the fused model to {output} (the base model is unchanged); "
        f"load it with mlx_lm.load('{output}')"
    )
    if upload_repo:
        from mlx_lm.utils import upload_to_hub

        upload_to_hub(str(output), upload_repo)
    return output


def _fuse_layers(net: nn.Module, adapter_path, dequantize: bool) -> int:
    """Replace every adapter layer of `net` by its fused linear, one layer at a time; returns
    how many. ModelError when the adapters put none in."""
    adapted = [
        (name, m) for name, m in net.named_modules() if isinstance(m, model_lib.ADAPTER_LAYERS)
    ]
    if not adapted:
        raise model_lib.ModelError(
            f"{adapter_path}: no adapter layers were inserted; nothing to fuse"
        )
    fused = []
    with Progress("fusing", len(adapted), unit="layers") as progress:
        for name, m in adapted:
            layer = m.fuse(dequantize=dequantize)
            mx.eval(layer.parameters())  # the work happens here, one layer at a time
            fused.append((name, layer))
            progress.update(1)
    net.update_modules(tree_unflatten(fused))
    return len(fused)


def quantization_config(model: nn.Module) -> dict | None:
    """mlx-lm's `quantization` config entry for the quantized layers of `model`: the most common
    (group_size, bits, mode) as the default, plus one entry per layer that differs."""
    layers = {
        name: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    if not layers:
        return None
    counts = Counter(tuple(q.items()) for q in layers.values())
    default = dict(counts.most_common(1)[0][0])
    return {**default, **{name: q for name, q in layers.items() if q != default}}


def save(output: Path, model: nn.Module, tokenizer, config: dict, source: Path, *, card: str):
    """Weights (with progress), config.json, tokenizer files, the source's *.py and
    generation_config.json, and the model card `card` as README.md. (mlx_lm.utils.save does
    the same but fetches the base's card from the Hub.)"""
    from mlx_lm.utils import save_config

    write_weights(output, model)
    save_config(config, output / "config.json")
    tokenizer.save_pretrained(str(output))
    for pattern in ("*.py", "generation_config.json"):
        for file in glob.glob(str(Path(source) / pattern)):
            shutil.copy(file, output)
    (output / "README.md").write_text(card)


def write_weights(output: Path, model: nn.Module) -> None:
    """mlx_lm.utils.save_model's files (shards + index), showing progress in MB written."""
    from mlx_lm.utils import get_total_parameters, make_shards

    output.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in weights.values())
    shards = make_shards(weights, max_file_size_gb=1)  # smaller shards: progress moves
    name = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    with Progress("writing", -(-total // 2**20), unit="MB") as progress:
        for i, shard in enumerate(shards):
            file = name.format(i + 1, len(shards))
            mx.save_safetensors(str(output / file), shard, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(shard, file))
            progress.update(sum(v.nbytes for v in shard.values()) // 2**20)
    index = {
        "metadata": {"total_size": total, "total_parameters": get_total_parameters(model)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def model_card(model: str, adapter_path: str | Path, *, dequantize: bool = False) -> str:
    """README.md of a fused model: base model, adapter run, loss and its settings, training
    settings and the run's final metrics (from adapter_config.json and metrics.jsonl)."""
    run = Path(adapter_path)
    config = _read_json(run / "adapter_config.json") or {}
    hub_id = _hub_id(model)
    losses = config.get("loss_type") or ["?"]
    training = ("fine_tune_type", "lora_rank", "lora_scale", "num_layers", "learning_rate")
    training += ("iters", "epochs", "batch_size", "grad_accumulation_steps", "max_length", "seed")
    front = ["---", "library_name: mlx", "pipeline_tag: text-generation"]
    front += ["tags: [mlx, mlx-dpo, dpo]"] + ([f"base_model: {hub_id}"] if hub_id else [])
    title = hub_id or "/".join(Path(model).parts[-2:])
    lines = front + ["---", "", f"# {title} + DPO adapters (fused)", ""]
    lines += [
        f"- base model: `{model}`" + ("" if hub_id else " (a local directory)"),
        f"- adapter run: `{run}` (fused with `mlx_dpo fuse`"
        + (", weights dequantized to float)" if dequantize else ")"),
        f"- loss: {' + '.join(losses)}; "
        + ", ".join(f"{k}={v}" for k, v in loss_settings(config).items()),
        "- training: "
        + ", ".join(f"{k}={config[k]}" for k in training if config.get(k) is not None),
        f"- data: `{config.get('data', '?')}`",
        "",
    ]
    lines += _final_metrics(run / "metrics.jsonl")
    lines += ["", "Load it with `mlx_lm.load(PATH)`; it needs no adapters.", ""]
    return "\n".join(lines)


def loss_settings(config: dict) -> dict:
    """The loss options of a run that matter for its loss types (beta always; the others when
    a chosen loss reads them or they differ from their defaults)."""
    names = set(config.get("loss_type") or [])
    defaults = TrainConfig()
    reads = {
        "discopop_tau": "discopop",
        "simpo_gamma": "simpo",
        "ipo_length_normalize": "ipo",
    }
    out = {}
    for key in LOSS_FIELDS:
        if key == "loss_type" or key not in config or config[key] is None:
            continue
        alpha = config.get("f_divergence_type") == "alpha_divergence"
        if (
            key == "beta"
            or reads.get(key) in names
            or (key == "f_alpha_divergence_coef" and alpha)
            or (key not in reads and config[key] != getattr(defaults, key))
        ):
            out[key] = config[key]
    return out


def _final_metrics(path: Path) -> list[str]:
    last: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "split" in row:
                last[row["split"]] = row
    if not last:
        return ["Final metrics: none recorded (no metrics.jsonl in the adapter run)."]
    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
    out = ["Final metrics of the run:", "", "| split | step | " + " | ".join(keys) + " |"]
    out.append("|---" * (len(keys) + 2) + "|")
    for split, row in last.items():
        values = [f"{row[k]:.4f}" if isinstance(row.get(k), float) else "" for k in keys]
        out.append(f"| {split} | {row.get('step', '')} | " + " | ".join(values) + " |")
    return out


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _hub_id(model: str) -> str | None:
    return None if Path(model).expanduser().exists() else model
