"""The same LoRA DPO step in PyTorch, run in its own process by bench.py (`--compare-torch`).

Same checkpoint (a Qwen2 written by common.write_checkpoint, or any Qwen2 directory), same
LoRA placement, rank, scale and initial lora_a (read from the MLX side's safetensors), same
synthetic batch, cached reference log-probs, sigmoid DPO loss (beta 0.1), global-norm clipping
at 1.0, AdamW. Implementations:
  own          a 60-line Qwen2 (F.scaled_dot_product_attention with GQA) - the fastest eager
  hf           transformers' Qwen2ForCausalLM (sdpa attention) with the same hand-written LoRA
Head: `completion` projects only completion positions through the LM head (what mlx_dpo does);
`full` computes logits at every position and a full log_softmax (what TRL does).
`compile` wraps the loss in torch.compile (inductor). Threads: all cores (torch's default).
Device: CUDA, else MPS, else the CPU (`--device`; bench.py's `--torch-device`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    LORA_KEYS,
    Geometry,
    max_rss_mb,
    read_spec,
    step_flops,
    summarize,
    synthetic_token_ids,
)


class LoRALinear(nn.Module):
    """base(x) + scale * (x @ A) @ B, A (in, r), B (r, out): mlx-lm's layout and init."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_a = nn.Parameter(a.clone())
        self.lora_b = nn.Parameter(torch.zeros(a.shape[1], base.out_features))

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.lora_a) @ self.lora_b)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(T: int, hd: int, theta: float, device=None):
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd)
    ang = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, spec):
        super().__init__()
        d, hd = spec.hidden_size, spec.head_dim
        self.h, self.hkv, self.hd = spec.num_attention_heads, spec.num_key_value_heads, hd
        self.input_layernorm = RMSNorm(d, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, spec.rms_norm_eps)
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        for key, (fan_in, fan_out) in spec.linear_shapes().items():
            owner, name = key.split(".")
            bias = name in ("q_proj", "k_proj", "v_proj")
            setattr(getattr(self, owner), name, nn.Linear(fan_in, fan_out, bias=bias))

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        a, m = self.self_attn, self.mlp
        h = self.input_layernorm(x)
        q = a.q_proj(h).view(B, T, self.h, self.hd).transpose(1, 2)
        k = a.k_proj(h).view(B, T, self.hkv, self.hd).transpose(1, 2)
        v = a.v_proj(h).view(B, T, self.hkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        h = self.post_attention_layernorm(x)
        return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


class Qwen2(nn.Module):
    """Backbone + tied head; `hidden(tokens)` returns the final-normed hidden states."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def hidden(self, tokens):
        cos, sin = rope_tables(
            tokens.shape[1], self.spec.head_dim, self.spec.rope_theta, tokens.device
        )
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    @property
    def head_weight(self):
        return self.embed_tokens.weight


def load_own(path: Path, spec) -> Qwen2:
    from safetensors.torch import load_file

    model = Qwen2(spec)
    weights = {
        k.removeprefix("model."): v for k, v in load_file(path / "model.safetensors").items()
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(f"checkpoint mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


class HFWrapper(nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.layers = hf.model.layers

    def hidden(self, tokens):
        return self.hf.model(input_ids=tokens).last_hidden_state

    @property
    def head_weight(self):
        return self.hf.lm_head.weight


def load_hf(path: Path) -> HFWrapper:
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return HFWrapper(hf.eval())


def add_lora(model, lora_init: dict, scale: float) -> None:
    """Wrap every LORA_KEYS linear of every block, with lora_a from the MLX side."""
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(model.layers):
        for key in LORA_KEYS:
            owner, name = key.split(".")
            parent = getattr(layer, owner)
            a = torch.from_numpy(np.asarray(lora_init[f"model.layers.{i}.{key}.lora_a"]))
            setattr(parent, name, LoRALinear(getattr(parent, name), a, scale))


def batch_tensors(geo: Geometry, vocab: int, seed: int, pad_to: int = 32) -> dict:
    """The layout of mlx_dpo.data.collate (chosen rows, then rejected rows; right padding)."""
    prompts, chosen, rejected = synthetic_token_ids(geo, vocab, seed)
    rows = [p + c for p, c in zip(prompts, chosen, strict=True)]
    rows += [p + r for p, r in zip(prompts, rejected, strict=True)]
    starts = [len(p) for p in prompts] * 2
    T = pad_to * math.ceil(max(map(len, rows)) / pad_to)
    C = pad_to * math.ceil(max(len(r) - s for r, s in zip(rows, starts, strict=True)) / pad_to)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T - 1)
    positions = torch.zeros(len(rows), C, dtype=torch.long)
    targets = torch.zeros(len(rows), C, dtype=torch.long)
    target_mask = torch.zeros(len(rows), C)
    for i, (row, s) in enumerate(zip(rows, starts, strict=True)):
        n = len(row) - s
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, s - 1 : len(row) - 1] = 1
        positions[i, :n] = torch.arange(s - 1, len(row) - 1)
        targets[i, :n] = torch.tensor(row[s:])
        target_mask[i, :n] = 1
    n_tokens = sum(map(len, rows))
    return dict(tokens=tokens, mask=mask, positions=positions, targets=targets,
                target_mask=target_mask, n_tokens=n_tokens)  # fmt: skip


def sequence_logps(model, b: dict, head: str) -> torch.Tensor:
    hidden = model.hidden(b["tokens"][:, :-1])
    w = model.head_weight
    if head == "completion":  # only completion positions through the head (as mlx_dpo)
        h = torch.gather(hidden, 1, b["positions"][..., None].expand(-1, -1, hidden.shape[-1]))
        logits = h @ w.T
        picked = torch.gather(logits, -1, b["targets"][..., None])[..., 0]
        return ((picked - torch.logsumexp(logits, -1)) * b["target_mask"]).sum(-1)
    logp = F.log_softmax(hidden @ w.T, -1)  # full logits, as TRL
    picked = torch.gather(logp, -1, b["tokens"][:, 1:, None])[..., 0]
    return (picked * b["mask"]).sum(-1)


def dpo_loss(logps, ref, beta: float):
    n = logps.shape[0] // 2
    margin = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
    return -F.logsigmoid(beta * margin).mean()


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, else MPS, else the CPU."""
    if name == "auto":
        mps = getattr(torch.backends, "mps", None)
        name = "cuda" if torch.cuda.is_available() else "cpu"
        name = "mps" if name == "cpu" and mps is not None and mps.is_available() else name
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def gemm_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model_dir)
    spec = read_spec(path)
    geo = Geometry(args.pairs, args.prompt_len, args.completion_len)
    from safetensors.numpy import load_file

    lora_init = load_file(args.lora_init)
    device = pick_device(args.device)
    b = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in batch_tensors(geo, spec.vocab_size, args.seed).items()
    }
    out = {
        "torch_version": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "gemm_peak_gflops": gemm_peak(device, 512 if args.tiny else 2048),
        "results": {},
    }
    models = {}
    for variant in args.variants:
        impl, head, *flags = variant.split(":")
        if impl not in models:
            model = load_own(path, spec) if impl == "own" else load_hf(path)
            add_lora(model, lora_init, args.lora_scale)
            model.to(device)
            init = {n: p.detach().clone() for n, p in _lora_names(model)}
            models[impl] = model, init
        model, init = models[impl]
        with torch.no_grad():  # every variant starts from the same init (lora_b = 0)
            for n, p in _lora_names(model):
                p.copy_(init[n])
        res = measure(model, b, head, "compile" in flags, args)
        scored = b["positions"].shape[1] if head == "completion" else b["tokens"].shape[1] - 1
        positions = b["tokens"].shape[1] - 1
        res["flops"] = step_flops(spec, geo.rows, positions, scored, args.lora_rank)
        where = "" if device.type == "cpu" else f"[{device.type}]"
        out["results"][f"torch{where}-{variant}"] = res
    out["max_rss_mb"] = max_rss_mb()
    out["batch"] = {"tokens": b["n_tokens"], "T": int(b["tokens"].shape[1])}
    return out


def measure(model, b: dict, head: str, compile_loss: bool, args) -> dict:
    """Step-0 numbers, then per-phase times over warm-up + repeats."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        ref = sequence_logps(model, b, head)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

    def loss_fn():
        return dpo_loss(sequence_logps(model, b, head), ref, args.beta)

    if compile_loss:
        loss_fn = torch.compile(loss_fn)

    def ref_fwd():
        with torch.no_grad():
            sequence_logps(model, b, head)

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    def update():
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return norm

    loss = fwd_bwd()  # the numbers the MLX side must match
    res: dict = {
        "step0": {
            "policy_logps": ref.tolist(),
            "loss": loss.item(),
            "grad_norms": {n: p.grad.norm().item() for n, p in _lora_names(model)},
        }
    }
    opt.zero_grad(set_to_none=True)
    seconds: dict = {k: [] for k in ("reference", "fwd_bwd", "optimizer", "step")}
    t_warm = time.perf_counter()
    for r in range(args.warmup + args.repeats):
        times = {}
        for name, fn in (("reference", ref_fwd), ("fwd_bwd", fwd_bwd), ("optimizer", update)):
            t0 = time.perf_counter()
            fn()
            synchronize(b["tokens"].device)
            times[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fwd_bwd()
        update()
        synchronize(b["tokens"].device)
        times["step"] = time.perf_counter() - t0
        if r == args.warmup - 1:
            res["warmup_s"] = time.perf_counter() - t_warm
        if r >= args.warmup:
            for k, v in times.items():
                seconds[k].append(v)
    res.update({k: summarize(v) for k, v in seconds.items()})
    return res


def _lora_names(model):
    """(mlx-style name, parameter) of every LoRA parameter: model.layers.i.<key>.lora_a|b."""
    for i, layer in enumerate(model.layers):
        for key in LORA_KEYS:
            owner, name = key.split(".")
            mod = getattr(getattr(layer, owner), name)
            yield f"model.layers.{i}.{key}.lora_a", mod.lora_a
            yield f"model.layers.{i}.{key}.lora_b", mod.lora_b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--lora-init", required=True, help="safetensors of the MLX side's lora_a")
    p.add_argument("--variants", nargs="+", default=["own:completion", "own:full"])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, ...")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    Path(args.json).write_text(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
