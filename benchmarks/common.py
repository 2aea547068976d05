"""What the MLX and the PyTorch sides of the benchmark share: model shapes, the checkpoint
writer, the synthetic batch, and the FLOP count. Imports neither MLX nor torch (each side runs
in its own process)."""

from __future__ import annotations

import json
import os
import resource
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Spec:
    """A Qwen2-style decoder (q/k/v biases, GQA, SwiGLU, RMSNorm, RoPE, tied embeddings)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one block, by its LoRA key."""
        d, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        return {
            "self_attn.q_proj": (d, q),
            "self_attn.k_proj": (d, kv),
            "self_attn.v_proj": (d, kv),
            "self_attn.o_proj": (q, d),
            "mlp.gate_proj": (d, i),
            "mlp.up_proj": (d, i),
            "mlp.down_proj": (i, d),
        }

    def params(self) -> dict[str, int]:
        block = sum(a * b for a, b in self.linear_shapes().values())
        layers = self.num_hidden_layers * block
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return {"layers": layers, "embedding": embed, "total": layers + embed + head}


# "mid" is the 40M model of the first speed study; "mid-152k" the same with Qwen's
# 151936-token vocabulary; "small" is a 5M model with head dim 64, "5m" the same with 8 heads of
# 32 (the issue's shape); "smollm2-135m" and "qwen2.5-0.5b" are those models' configurations
# (random weights); "tiny" is for tests.
SPECS = {
    "tiny": Spec(64, 2, 4, 2, 128, 512),
    "small": Spec(256, 4, 4, 2, 704, 8192),
    "5m": Spec(256, 4, 8, 2, 704, 8192),
    "mid": Spec(512, 8, 8, 2, 1408, 32000),
    "mid-152k": Spec(512, 8, 8, 2, 1408, 151936),
    # the real configurations' dimensions, written as Qwen2-style checkpoints (SmolLM2 is a
    # Llama: no q/k/v biases, rope_theta 1e5; the biases are 0.1% of its FLOPs)
    "smollm2-135m": Spec(576, 30, 9, 3, 1536, 49152, rope_theta=100000.0, rms_norm_eps=1e-5),
    "qwen2.5-0.5b": Spec(896, 24, 14, 2, 4864, 151936, rope_theta=1000000.0),
}


def write_checkpoint(path: str | Path, spec: Spec, seed: int = 0) -> Path:
    """A random float32 Qwen2 checkpoint in Hugging Face layout (config.json +
    model.safetensors), loadable by mlx-lm and transformers; no tokenizer (timing only)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **{k: v for k, v in asdict(spec).items()},
        "max_position_embeddings": 8192,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": 0,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(seed)

    def w(*shape: int, std: float = 0.02) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    d = spec.hidden_size
    weights = {"model.embed_tokens.weight": w(spec.vocab_size, d), "model.norm.weight": 1 + w(d)}
    if not spec.tie_word_embeddings:
        weights["lm_head.weight"] = w(spec.vocab_size, d)
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = 1 + w(d)
        weights[p + "post_attention_layernorm.weight"] = 1 + w(d)
        for key, (fan_in, fan_out) in spec.linear_shapes().items():
            weights[p + key + ".weight"] = w(fan_out, fan_in)
            if key in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                weights[p + key + ".bias"] = w(fan_out)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def read_spec(path: str | Path) -> Spec:
    config = json.loads((Path(path) / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    fields = {k: config[k] for k in Spec.__dataclass_fields__ if k in config}
    return Spec(**{**fields, "rope_theta": theta})


@dataclass(frozen=True)
class Geometry:
    """A batch of `pairs` synthetic pairs: a shared prompt and two completions, fixed lengths."""

    pairs: int
    prompt_len: int
    completion_len: int

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def row_tokens(self) -> int:
        return self.prompt_len + self.completion_len


def synthetic_token_ids(geo: Geometry, vocab: int, seed: int = 0):
    """(prompts, chosen, rejected): lists of int lists, the same on both sides of the bench."""
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(1, vocab, size=n).tolist()

    prompts = [ids(geo.prompt_len) for _ in range(geo.pairs)]
    chosen = [ids(geo.completion_len) for _ in range(geo.pairs)]
    rejected = [ids(geo.completion_len) for _ in range(geo.pairs)]
    return prompts, chosen, rejected


def step_flops(
    spec: Spec, rows: int, positions: int, scored: int, lora_rank: int, head_rows: int | None = None
) -> dict:
    """Model FLOPs of one LoRA DPO step (cached reference) and of one reference forward.

    rows x positions tokens go through the blocks (positions = T - 1); `scored` tokens of each
    of `head_rows` rows (default `rows`; 2 x rows in the shared-prompt layout, whose row holds
    both answers) go through the LM head (the completion-only path; T - 1 for full logits).
      forward   = 2 P_layers N + 2 P_head N_head + A + 2 P_lora N
      backward  = 2 P_layers N + 2 P_head N_head + 2 A + 4 P_lora N
    N = rows * positions, N_head = rows * scored, A = 4 rows H T^2 hd per layer (QK^T and PV
    over the full T x T square, as MLX computes it). The frozen base needs only dX in the
    backward (no dW): 4 P N per step instead of full fine-tuning's 6 P N. LoRA's backward is
    its dX plus its dA, dB. Recomputation (the lean head's VJP, --grad-checkpoint) is not
    counted: this is model FLOPs, not hardware FLOPs.
    """
    n, n_head = rows * positions, (rows if head_rows is None else head_rows) * scored
    p = spec.params()
    p_lora = spec.num_hidden_layers * sum(
        lora_rank * (a + b) for a, b in spec.linear_shapes().values()
    )
    attn = spec.num_hidden_layers * 4 * rows * spec.num_attention_heads
    attn *= positions * positions * spec.head_dim
    head = 2 * spec.vocab_size * spec.hidden_size * n_head
    base = 2 * p["layers"] * n + head
    forward = base + attn + 2 * p_lora * n
    backward = base + 2 * attn + 4 * p_lora * n
    return {
        "params_layers": p["layers"],
        "params_head": spec.vocab_size * spec.hidden_size,
        "params_lora": p_lora,
        "tokens": n,
        "head_tokens": n_head,
        "reference_forward": base + attn,
        "policy_forward": forward,
        "policy_backward": backward,
        "step": forward + backward,
    }


def summarize(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"min_ms": min(ms), "median_ms": statistics.median(ms), "n": len(ms)}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def marginal_step_times(marks: list[float], warmup: int) -> dict:
    """Seconds between consecutive step marks, and their min and median after `warmup` steps
    (all of them when the run was shorter): the marginal cost of an update."""
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    marginal = gaps[warmup:] or gaps
    return {
        "step_s_min": min(marginal),
        "step_s_median": sorted(marginal)[len(marginal) // 2],
        "step_times": gaps,
    }
