"""Load an mlx-lm model, pick the compute path, and add (or remove) LoRA/DoRA adapters.

Decisions:
- The reference is the same weights with the adapters off; no second copy is ever loaded.
- On MLX's CPU backend `quantized_matmul` runs at ~3 GFLOP/s and bf16 matmul at ~7 against
  ~400 for fp32 sgemm, so there a quantized base keeps its 4/8-bit storage and is dequantized to
  float32 right before each matmul (`DequantLinear`); on Metal and CUDA the native kernels stay
  (QuantizedLinear through `mx.quantized_matmul`, bf16/fp16 weights and activations). The choice
  is made from a `mlx_dpo.platform.Platform` (detected when not given), so tests run both paths
  on any machine. The dtype of each part of the step on each path: docs/precision.md.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlx_dpo import dequant
from mlx_dpo.config import with_absolute_paths
from mlx_dpo.errors import ModelError  # noqa: F401 (defined MLX-free; model.ModelError stays)
from mlx_dpo.platform import Platform, detect, set_wired_limit

ADAPTER_LAYERS = (LoRALinear, DoRALinear, LoRAEmbedding, DoRAEmbedding, LoRASwitchLinear)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    path: Path  # local directory holding the weights
    config: dict  # the model's config.json (after our fixes)
    notes: list[str]  # things the user should know (quantization choices, compute path)


def resolve_path(model: str, revision: str | None = None) -> Path:
    """A local directory, or a Hub id resolved through huggingface-hub's cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a model directory (no config.json)")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelError(
            f"--model {model}: no such directory, and not a Hub id of the form org/name"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(
            snapshot_download(model, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS)
        )
    except LocalEntryNotFoundError:
        raise ModelError(
            f"--model {model}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline?). Download it once with `hf download " + model + "`."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelError(
            f"--model {model}: could not fetch from the Hub ({type(e).__name__}: {e})"
        ) from None


def _config_fixes(path: Path) -> dict:
    # transformers >= 5 writes rope_theta under rope_parameters; mlx-lm 0.32 ignores it and
    # silently falls back to its own default (logits drift by up to 0.2).
    config = json.loads((path / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        return {"rope_theta": rope["rope_theta"]}
    return {}


def load(
    model: str,
    *,
    revision: str | None = None,
    quantize: int | None = None,
    q_group_size: int = 64,
    compute_dtype: str = "auto",
    share_prompt: bool = True,
    platform: Platform | None = None,
) -> LoadedModel:
    """Load model and tokenizer, optionally quantize, and set up the compute path for
    `platform` (default: this machine's) and, if `share_prompt` and the model passes its
    check, the shared-prompt layout (mlx_dpo.shared_prompt)."""
    from mlx_lm.utils import load_model, load_tokenizer

    from mlx_dpo import shared_prompt

    path = resolve_path(model, revision)
    fixes = _config_fixes(path)
    try:
        net, config = load_model(path, model_config=fixes)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: cannot be loaded by mlx-lm ({type(e).__name__}: {e})") from None
    notes = [f"rope_theta={fixes['rope_theta']} taken from rope_parameters"] if fixes else []
    if quantize:
        notes += quantize_model(net, bits=quantize, group_size=q_group_size)
    notes += set_compute_path(net, compute_dtype, platform)
    notes += shared_prompt.install(net, share_prompt)
    net.freeze()
    net.eval()
    settle(net)
    return LoadedModel(net, tokenizer, path, config, notes)


def settle(net: nn.Module) -> None:
    """Quantize now (not inside the first step) and hand what loading freed back to the OS: the
    float weights a quantization replaced, its temporaries and the shared-prompt check's
    (together several times the quantized size). Under the 8 GB cache limit a CPU run sets, they
    would stay resident as cached buffers that the step's differently shaped arrays rarely reuse."""
    mx.eval(net.parameters())
    mx.clear_cache()


def load_tokenizer_only(model: str, revision: str | None = None):
    """The tokenizer of `model` without loading its weights (for `data check`)."""
    from mlx_lm.utils import load_config, load_tokenizer

    path = resolve_path(model, revision)
    config = load_config(path)
    return load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))


def _group_size_for(width: int, preferred: int) -> int | None:
    for g in (preferred, 128, 64, 32):
        if width % g == 0:
            return g
    return None


def quantize_model(model: nn.Module, *, bits: int, group_size: int) -> list[str]:
    """Quantize every Linear/Embedding; a layer whose width the group size does not divide gets
    a smaller group size that does, or stays unquantized (and is named in the notes)."""
    skipped, regrouped = [], {}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        g = _group_size_for(module.weight.shape[-1], group_size)
        if g is None:
            skipped.append(path)
            return False
        if g != group_size:
            regrouped[path] = g
        return {"group_size": g, "bits": bits}

    nn.quantize(model, class_predicate=predicate)
    notes = [f"quantized to {bits} bits (group size {group_size})"]
    if regrouped:
        notes.append(
            f"{len(regrouped)} layers use a smaller group size: {sorted(set(regrouped.values()))}"
        )
    if skipped:
        notes.append(
            f"{len(skipped)} layers left unquantized (width not a multiple of 32): {skipped[:4]}"
        )
    return notes


def _dequantized(module: nn.Module, x: mx.array) -> mx.array:
    """The float32 weight of a quantized layer, rebuilt for its use on `x` and then freed.

    Tied to `x`: otherwise the rebuild reads only frozen arrays, and `mx.compile` merges a
    --grad-checkpoint recomputation's rebuild with the forward's (the same op on the same
    inputs), which then stays alive from the forward to the backward: every block's float32
    weights held at once, what the checkpoint was to avoid."""
    return dequant.dequantize(
        mx.depends(module["weight"], mx.stop_gradient(x)),
        module["scales"],
        module.get("biases"),
        module.group_size,
        module.bits,
        mode=module.mode,
    )


class DequantLinear(nn.QuantizedLinear):
    """Quantized storage, float32 compute: dequantize right before the matmul (fast on CPU)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = x.astype(mx.float32) @ _dequantized(self, x).T
        return y + self["bias"] if "bias" in self else y


class DequantEmbedding(nn.QuantizedEmbedding):
    """Quantized embedding whose tied output projection runs in float32 (see DequantLinear)."""

    def __call__(self, x: mx.array) -> mx.array:
        return dequant.rows(self, x, self.group_size, self.bits, self.mode)

    def as_linear(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32) @ _dequantized(self, x).T


def set_compute_path(
    model: nn.Module, compute_dtype: str = "auto", platform: Platform | None = None
) -> list[str]:
    """Choose how the frozen base computes on `platform`; returns notes for the user.

    "auto": on a CPU, float32 (quantized layers dequantized at use, the x86 kernels where they
    apply); on Metal/CUDA the model's own dtype and quantized kernels ("native"). A float dtype
    casts every float parameter to it (quantized layers keep their storage; with float32 they
    are dequantized at use)."""
    from mlx_dpo import cpu_kernels

    platform = platform or detect()
    on_cpu = not platform.gpu
    notes = [n for n in [set_wired_limit(platform)] if n]
    if compute_dtype == "native" or (compute_dtype == "auto" and not on_cpu):
        # mlx-lm's own attention and SwiGLU (undoes an earlier x86 model's swap in this process)
        cpu_kernels.install(model, platform, allowed=False)
        return notes
    dtype = mx.float32 if compute_dtype == "auto" else getattr(mx, compute_dtype)
    n_quant = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear and dtype == mx.float32:
            module.__class__, n_quant = DequantLinear, n_quant + 1
        elif type(module) is nn.QuantizedEmbedding and dtype == mx.float32:
            module.__class__, n_quant = DequantEmbedding, n_quant + 1
    floats = {
        k: v.astype(dtype)
        for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating)
    }
    n_cast = sum(
        v.dtype != floats[k].dtype for k, v in tree_flatten(model.parameters()) if k in floats
    )
    if n_cast:
        model.update(tree_unflatten(list(floats.items())))
    if n_quant:
        notes.append(
            f"{n_quant} quantized layers dequantized at use for {dtype} compute (fast on CPU)"
        )
    if n_cast:
        notes.append(f"{n_cast} tensors cast to {dtype} for compute")
    # The x86 kernels compute in float32: only on that path.
    notes += cpu_kernels.install(model, platform, allowed=on_cpu and dtype == mx.float32)
    return notes


def lora_parameters(cfg) -> dict:
    """mlx-lm's `lora_parameters` block of adapter_config.json."""
    params = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout}
    if cfg.lora_keys:
        params["keys"] = list(cfg.lora_keys)
    return params


def num_blocks(model: nn.Module) -> int:
    return len(model.layers)


def apply_adapters(model: nn.Module, cfg, seed: int = 0) -> int:
    """Freeze the base and insert LoRA/DoRA layers (lora_b = 0: policy == reference at step 0).
    Returns the number of trainable parameters."""
    model.freeze()
    mx.random.seed(seed)  # lora_a's random init
    n = num_blocks(model) if cfg.num_layers < 0 else min(cfg.num_layers, num_blocks(model))
    linear_to_lora_layers(model, n, lora_parameters(cfg), use_dora=cfg.fine_tune_type == "dora")
    return trainable_count(model)


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def load_adapter_dir(model: nn.Module, path: str | Path) -> dict:
    """Insert the adapter layers described by `path`/adapter_config.json and load its weights."""
    from mlx_lm.tuner.utils import load_adapters

    from mlx_dpo.rundir import RunDir

    path = Path(path)
    config = RunDir(path).adapter_config()
    weights = read_adapter_weights(RunDir(path).adapters_file())
    model.freeze()
    try:
        load_adapters(model, str(path))
    except (ValueError, KeyError, TypeError) as e:
        # mlx-lm lists every bad tensor on its own line after a header: keep the first one
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise ModelError(
            f"{path / 'adapters.safetensors'}: not adapters of this model and adapter config "
            f"({detail})"
        ) from None
    check_adapter_weights(model, weights, path / "adapters.safetensors")
    return config


def load_adapter_weights(model: nn.Module, path: Path) -> None:
    """Load `path`'s adapters.safetensors into adapter layers already in place, checked key by
    key and shape by shape first."""
    from mlx_dpo.rundir import RunDir

    file = RunDir(Path(path)).adapters_file()
    weights = read_adapter_weights(file)
    check_adapter_weights(model, weights, file)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def read_adapter_weights(file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except (OSError, RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(
            f"{file}: unreadable (truncated or not a safetensors file: {reason})"
        ) from None


def check_adapter_weights(model: nn.Module, weights: dict, file: Path) -> None:
    """The file must hold exactly the model's adapter parameters, with their shapes (mlx's
    non-strict loading would otherwise skip foreign keys without a word)."""
    expected = {k: v.shape for k, v in tree_flatten(model.trainable_parameters())}
    missing = sorted(set(expected) - set(weights))
    foreign = sorted(set(weights) - set(expected))
    shapes = [k for k in expected if k in weights and tuple(weights[k].shape) != expected[k]]
    if missing or foreign or shapes:
        first = (missing or foreign or shapes)[0]
        raise ModelError(
            f"{file}: not adapters of this model and adapter config "
            f"({len(missing)} missing, {len(foreign)} foreign, {len(shapes)} of another shape; "
            f"first: {first})"
        )


@contextmanager
def adapters_off(model: nn.Module):
    """Temporarily swap every adapter layer for its base layer: exact base outputs (also DoRA)."""
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)]
    if swapped:
        model.update_modules(
            tree_unflatten(
                [(name, m.linear if hasattr(m, "linear") else m.embedding) for name, m in swapped]
            )
        )
    try:
        yield model
    finally:
        if swapped:
            model.update_modules(tree_unflatten(swapped))


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass (mx.checkpoint), per instance."""
    from mlx_dpo import shared_prompt

    for block in model.layers:
        base = type(block)
        if getattr(base, "_mlx_dpo_checkpointed", False):
            continue
        call = base.__call__

        def checkpointed(self, *args, _call=call, **kwargs):
            layout = shared_prompt.current()

            def inner(params, *args, **kwargs):
                self.update(params)
                if layout is None:
                    return _call(self, *args, **kwargs)
                # the backward recomputes the block after the forward's `layout` has exited
                with shared_prompt.layout(*layout):
                    return _call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        # A subclass per block type keeps other models of the same class untouched.
        block.__class__ = type(
            base.__name__, (base,), {"__call__": checkpointed, "_mlx_dpo_checkpointed": True}
        )


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(cfg, model: nn.Module) -> dict:
    """adapter_config.json in mlx-lm's format (so mlx_lm.load/fuse read it), plus our config.
    Local paths are stored absolute, so `eval`/`compare`/`fuse` work from any directory."""
    n = num_blocks(model) if cfg.num_layers < 0 else min(cfg.num_layers, num_blocks(model))
    config = with_absolute_paths(cfg.to_dict())
    return {
        **config,
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": n,
        "lora_parameters": lora_parameters(cfg),
    }
