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
import shutil
from collections import Counter
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_dpo import model as model_lib
from mlx_dpo.config import ConfigError


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
    fused = [
        (name, m.fuse(dequantize=dequantize))
        for name, m in net.named_modules()
        if isinstance(m, model_lib.ADAPTER_LAYERS)
    ]
    if not fused:
        raise model_lib.ModelError(
            f"{adapter_path}: no adapter layers were inserted; nothing to fuse"
        )
    net.update_modules(tree_unflatten(fused))
    config = dict(loaded.config)
    if dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(net)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif "quantization" not in config and (q := quantization_config(net)) is not None:
        config["quantization"] = q  # quantized at load time (--quantize): record how
    log(f"fused {len(fused)} adapter layers from {adapter_path} into {loaded.path}")
    save(output, net, loaded.tokenizer, config, loaded.path, base_model=_hub_id(model))
    log(f"wrote {output} (load with mlx_lm.load('{output}'))")
    if upload_repo:
        from mlx_lm.utils import upload_to_hub

        upload_to_hub(str(output), upload_repo)
    return output


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


def save(
    output: Path,
    model: nn.Module,
    tokenizer,
    config: dict,
    source: Path,
    *,
    base_model: str | None = None,
) -> None:
    """Weights, config.json, tokenizer files, the source's *.py and generation_config.json, and
    a model card. (mlx_lm.utils.save does the same but fetches the base's card from the Hub.)"""
    from huggingface_hub import ModelCard, ModelCardData
    from mlx_lm.utils import save_config, save_model

    save_model(output, model)
    save_config(config, output / "config.json")
    tokenizer.save_pretrained(str(output))
    for pattern in ("*.py", "generation_config.json"):
        for file in glob.glob(str(Path(source) / pattern)):
            shutil.copy(file, output)
    card = ModelCard.from_template(
        ModelCardData(
            library_name="mlx",
            pipeline_tag="text-generation",
            tags=["mlx", "mlx-dpo", "dpo"],
            base_model=base_model,
        ),
        model_description="Base model with DPO-tuned adapters fused in by mlx_dpo.",
    )
    card.save(str(output / "README.md"))


def _hub_id(model: str) -> str | None:
    return None if Path(model).expanduser().exists() else model
