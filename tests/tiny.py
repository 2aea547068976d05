"""Tiny Hugging Face-format checkpoints built by the tests themselves (no network).

`build_tiny_model(path)` writes config.json, model.safetensors (random init, float32),
tokenizer.json (a byte-level BPE trained here on a fixed corpus) and tokenizer_config.json
with a ChatML chat template, in the layout both mlx-lm and transformers load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlx_dpo.config import TrainConfig
from mlx_dpo.data import CHATML
from mlx_dpo.demo.tokenizer import write_chat_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Please answer politely. Sure! Here is a short answer.",
    "one two three four five six seven eight nine ten",
    "user assistant system hello world good bad yes no",
]


def build_tokenizer(path: Path, vocab_size: int = 320, chat_template: str | None = CHATML) -> None:
    write_chat_tokenizer(
        path, CORPUS * 4, vocab_size, chat_template=chat_template, model_max_length=4096
    )


def build_tiny_model(
    path: str | Path,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    chat_template: str | None = CHATML,
) -> Path:
    """Write a random float32 checkpoint of `arch` ("qwen2" or "llama") and return its path."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path, chat_template=chat_template)
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    vocab_size = 64 * ((len(vocab) + 63) // 64)  # padded like real checkpoints
    eos_id = vocab["<|im_end|>"]
    heads, kv_heads, inter = 4, 2, 2 * hidden_size
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden_size,
        "intermediate_size": inter,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
        "eos_token_id": eos_id,
        "bos_token_id": None,
        "hidden_act": "silu",
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(seed)
    d, hd = hidden_size, hidden_size // heads

    def w(*shape: int, std: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": w(vocab_size, d, std=0.5),
        "model.norm.weight": 1 + w(d),
    }
    if not tie_word_embeddings:
        weights["lm_head.weight"] = w(vocab_size, d, std=0.2)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + w(d),
            p + "post_attention_layernorm.weight": 1 + w(d),
            p + "self_attn.q_proj.weight": w(heads * hd, d),
            p + "self_attn.k_proj.weight": w(kv_heads * hd, d),
            p + "self_attn.v_proj.weight": w(kv_heads * hd, d),
            p + "self_attn.o_proj.weight": w(d, heads * hd),
            p + "mlp.gate_proj.weight": w(inter, d),
            p + "mlp.up_proj.weight": w(inter, d),
            p + "mlp.down_proj.weight": w(d, inter),
        }
        if arch == "qwen2":  # Qwen2 has q/k/v biases
            weights |= {
                p + "self_attn.q_proj.bias": w(heads * hd),
                p + "self_attn.k_proj.bias": w(kv_heads * hd),
                p + "self_attn.v_proj.bias": w(kv_heads * hd),
            }
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# --- toy preference data and a small run's config, shared by the trainer tests
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "tree", "fish", "book", "star"]


def write_pairs(path, n: int, seed: int = 0, *, offset: int = 0) -> None:
    """A learnable preference: a polite answer over a curt one, whatever the question."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.choice(WORDS, 2, replace=False)
            row = {
                "prompt": f"Question {i + offset}: say {a} or {b}?",
                "chosen": f"Sure! {a}.",
                "rejected": f"No. {a}.",
            }
            f.write(json.dumps(row) + "\n")


def make_cfg(model, data, run_dir, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        data=str(data),
        adapter_path=str(run_dir),
        iters=2,
        batch_size=2,
        learning_rate=1e-3,
        steps_per_report=1,
        steps_per_eval=0,
        save_every=100,
        num_layers=-1,
        lora_rank=4,
        max_length=64,
        reference_cache=False,
        demo_summary=False,
    )
    return TrainConfig(**{**base, **kw})


def read_metrics(run_dir, split="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def quiet(*_):
    pass


def plain_pair_logps(model, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-probs of each pair, computed independently of the package's
    log-prob head and batching: one unpadded row at a time, the model's full logits, and a
    float64 log-softmax in numpy; the logit at position t scores token t+1."""
    import mlx.core as mx

    out = []
    for pair in pairs:
        sums = []
        for answer in (pair.chosen_ids, pair.rejected_ids):
            ids = list(pair.prompt_ids) + list(answer)
            logits = np.array(model(mx.array([ids[:-1]])).astype(mx.float32), dtype=np.float64)[0]
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            start = len(pair.prompt_ids) - 1  # the first completion token's scoring position
            sums.append(sum(logp[t, ids[t + 1]] for t in range(start, len(ids) - 1)))
        out.append(sums)
    both = np.array(out, dtype=np.float64)
    return both[:, 0], both[:, 1]


def make_adapter(base: Path, out: Path, *, seed: int = 0, std: float = 0.02, **settings) -> Path:
    """An adapter directory as a run writes it, with random (non-zero) lora_b so it matters."""
    import mlx.core as mx

    from mlx_dpo import model as model_lib

    cfg = TrainConfig(**{"model": str(base), "num_layers": -1, "lora_rank": 4, **settings})
    loaded = model_lib.load(str(base), quantize=cfg.quantize, q_group_size=cfg.q_group_size)
    model_lib.apply_adapters(loaded.model, cfg, seed=seed)
    rng = np.random.default_rng(seed)
    weights = {
        k: mx.array((rng.standard_normal(v.shape) * std).astype(np.float32))
        if k.endswith("lora_b")
        else v
        for k, v in model_lib.adapter_weights(loaded.model).items()
    }
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = model_lib.adapter_config(cfg, loaded.model)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out
