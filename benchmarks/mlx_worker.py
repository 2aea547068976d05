"""The MLX side of the benchmark, run in its own process by bench.py (`--worker mlx`).

It loads the checkpoint, builds one synthetic preference batch, inserts LoRA adapters as
`mlx_dpo train` does, and times each variant's phases with their rounds interleaved. A variant
is the trainer's own step (trainer.make_step: trainer.batch_loss under nn.value_and_grad,
compiled, AdamW with the trainer's clipping) with one lever changed; see VARIANTS. On the x86 CPU build every variant
runs with mlx_dpo.cpu_kernels (fast exp, flash attention), as training does, unless it opts out.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mlx_dpo import _blas

_blas.preload()  # importing mlx_dpo did it already; it must precede mlx.core
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from common import Geometry, read_spec, step_flops, summarize, synthetic_token_ids  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from mlx_dpo import cpu_kernels, data, memory, trainer  # noqa: E402
from mlx_dpo import model as model_lib  # noqa: E402
from mlx_dpo.config import TrainConfig  # noqa: E402
from mlx_dpo.logps import forward_logps  # noqa: E402

BIG_CACHE = 8 << 30  # what run.py sets on the CPU
MLX_DEFAULT_CACHE = 32 << 20  # MLX 0.32's CPU default


@dataclass(frozen=True)
class Variant:
    """One way of running the step. `logps`: lean (completion-only, chunked: the default),
    plain (full logits, logsumexp at completion positions), naive (log_softmax over
    rows x T x V, then gather: what a straightforward implementation does). `exact_exp`: opted
    out of the fast CPU kernels (MLX_DPO_NO_FAST_EXP=1): mx.exp and mlx-lm's attention and
    SwiGLU; without it a variant runs as the package does (the kernels where enabled)."""

    name: str
    logps: str = "lean"
    compile: bool = True
    exact_exp: bool = False
    ckpt: bool = False
    cache_limit: int = BIG_CACHE
    online_ref: bool = False
    quantize: int | None = None
    compute_dtype: str = "auto"
    streams: int = 1  # the batch's pairs split over this many CPU streams (prototype)
    rounds: int | None = None  # cap (q4 native takes ~20 s a step)
    ref: bool = True  # time the reference forward too (the same as mlx_dpo's for some)
    ref_big: bool = False  # and the precompute at --ref-batch-pairs
    warmup: int | None = None  # cap
    note: str = ""


VARIANTS = {
    v.name: v
    for v in [
        Variant(
            "mlx_dpo",
            ref_big=True,
            note="the trainer's step: lean log-probs, compiled, cached reference (+cpu_kernels)",
        ),
        Variant(
            "mx.exp",
            exact_exp=True,
            ref_big=True,
            note="MLX_DPO_NO_FAST_EXP=1: mx.exp, mlx-lm's attention and SwiGLU",
        ),
        Variant("plain-logits", logps="plain", note="full logits, lse at completion positions"),
        Variant("naive-logits", logps="naive", note="log_softmax over rows x T x V"),
        Variant("no-compile", compile=False),
        Variant("cache-32MB", cache_limit=MLX_DEFAULT_CACHE, note="MLX's default cache limit"),
        Variant(
            "online-ref", online_ref=True, ref=False, note="reference forward inside every step"
        ),
        Variant("grad-ckpt", ckpt=True, ref=False, note="mx.checkpoint per block"),
        Variant("grad-ckpt+mx.exp", ckpt=True, exact_exp=True, ref=False),
        Variant("q4-dequant", quantize=4, note="4-bit storage, fp32 compute (model.DequantLinear)"),
        Variant(
            "q4-native",
            quantize=4,
            compute_dtype="native",
            rounds=1,
            warmup=1,
            note="QuantizedLinear (quantized_matmul)",
        ),
        Variant("naive+ckpt", logps="naive", ckpt=True, ref=False),
        Variant("2streams", streams=2, ref=False, note="pairs split over 2 CPU streams"),
        Variant("2streams+mx.exp", streams=2, exact_exp=True, ref=False),
    ]
}


def naive_forward_logps(model, batch, **_):
    """Summed completion log-probs the straightforward way: full log_softmax over every
    position, gather each next token, then keep the completion positions."""
    tokens = batch.tokens
    logp = nn.log_softmax(model(tokens[:, :-1]).astype(mx.float32), axis=-1)
    picked = mx.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    picked = mx.take_along_axis(picked, batch.positions, axis=1) * batch.target_mask
    return picked.sum(-1), batch.target_mask.sum(-1)


LOGPS = {
    "lean": forward_logps,
    "plain": functools.partial(forward_logps, lean=False),
    "naive": naive_forward_logps,
}


@contextlib.contextmanager
def patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def exact_exp(model):
    """Opted out of the fast CPU kernels: the env var makes the log-probs use mx.exp when the
    step is traced, and install() puts back mlx-lm's attention and SwiGLU (for the model's
    whole family); both undone on exit."""
    saved = os.environ.get(cpu_kernels.OPT_OUT_ENV)
    os.environ[cpu_kernels.OPT_OUT_ENV] = "1"
    cpu_kernels.install(model)
    try:
        yield
    finally:
        if saved is None:
            del os.environ[cpu_kernels.OPT_OUT_ENV]
        else:
            os.environ[cpu_kernels.OPT_OUT_ENV] = saved
        cpu_kernels.install(model)


@contextlib.contextmanager
def variant_context(variant: Variant, model):
    """Everything the variant changes, undone on exit (steps are traced inside it)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(trainer, "forward_logps", LOGPS[variant.logps]))
        previous = mx.set_cache_limit(variant.cache_limit)
        stack.callback(mx.set_cache_limit, previous)
        if variant.exact_exp:
            stack.enter_context(exact_exp(model))
        if variant.ckpt:
            saved = [(b, type(b)) for b in model.layers]
            model_lib.enable_grad_checkpoint(model)
            stack.callback(lambda: [setattr(b, "__class__", c) for b, c in saved])
        yield


def train_config(args) -> TrainConfig:
    return TrainConfig(
        num_layers=-1, lora_rank=args.lora_rank, lora_scale=args.lora_scale, batch_size=args.pairs
    )


def load_model(path: str, quantize=None, compute_dtype="auto", share_prompt=False):
    """The model as model_lib.load sets it up (the shared-prompt layout only if asked: this
    worker's own variants time two rows per pair)."""
    from mlx_lm.utils import load_model as mlx_load

    from mlx_dpo import shared_prompt

    path = Path(path)
    net, _ = mlx_load(path, model_config=model_lib._config_fixes(path))
    notes = model_lib.quantize_model(net, bits=quantize, group_size=64) if quantize else []
    notes += model_lib.set_compute_path(net, compute_dtype)
    notes += shared_prompt.install(net, share_prompt)
    net.freeze()
    net.eval()
    model_lib.settle(net)
    return net, notes


def make_batch(geo: Geometry, vocab: int, seed: int, refs=None, share_prompt=False):
    prompts, chosen, rejected = synthetic_token_ids(geo, vocab, seed)
    pairs = [
        data.PreferencePair(p, c, r, source="synthetic", prompt="")
        for p, c, r in zip(prompts, chosen, rejected, strict=True)
    ]
    kw = {} if refs is None else {"ref_chosen": refs[0], "ref_rejected": refs[1]}
    return pairs, data.collate(pairs, **kw, share_prompt=share_prompt)


def reference_logps(model, batch):
    """No-grad summed completion log-probs with the adapters off, as reference.pair_logps does."""
    with model_lib.adapters_off(model):
        logps, _ = trainer.forward_logps(model, batch)
    return mx.stop_gradient(logps)


def online_ref_loss(model, batch, loss_kwargs):
    """trainer.batch_loss with the reference log-probs computed inside the step."""
    ref, b = reference_logps(model, batch), batch.ref_chosen.shape[0]
    batch = replace(batch, ref_chosen=ref[:b], ref_rejected=ref[b:])
    return trainer.batch_loss(model, batch, loss_kwargs)


class Step:
    """trainer.make_step for one variant, with its own AdamW. With several streams there is one
    compiled step per CPU stream (each traces its ops onto its own stream) and the
    micro-batches run concurrently, one per stream (a prototype; trainer.train runs them one
    after the other)."""

    def __init__(self, model, cfg: TrainConfig, variant: Variant):
        self.model, self.variant, self.cfg = model, variant, cfg
        self.optimizer = trainer.build_optimizer(cfg, 1000)
        self.optimizer.init(model.trainable_parameters())
        loss = online_ref_loss if variant.online_ref else None
        self.steps = [
            trainer.make_step(model, self.optimizer, cfg, compile=variant.compile, loss=loss)
            for _ in range(variant.streams)
        ]
        self.streams = [mx.new_stream(mx.cpu) for _ in range(variant.streams)]
        self.state = self.steps[0].state

    def grads(self, micro: list):
        """Metrics and gradients averaged over the micro-batches (`data.Batch`es)."""
        if len(self.steps) == 1:
            return self.steps[0].grads(micro)
        out = []
        for stream, step, batch in zip(self.streams, self.steps, micro, strict=True):
            with mx.stream(stream):
                out.append(step.grads([batch]))
        n = len(out)
        metrics = {k: sum(m[k] for m, _ in out) / n for k in out[0][0]}
        grads = tree_map(lambda *g: sum(g) / n, *(g for _, g in out))
        return metrics, grads

    def apply_update(self, grads):
        return self.steps[0].update(grads)

    def __call__(self, micro: list):
        """One whole update: (metrics, gradient norm), lazy."""
        metrics, grads = self.grads(micro)
        return metrics, self.apply_update(grads)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure_phases(step: Step, micro, batch, big_batch, record: dict) -> None:
    """One round: each phase timed and its allocator peak recorded (above the live memory
    before it: weights, adapters, optimizer state)."""
    model = step.model

    def run(name, fn):
        gc.collect()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        seconds, out = timed(fn)
        rec = record.setdefault(name, {"seconds": [], "peak_above_bytes": 0, "peak_bytes": 0})
        rec["seconds"].append(seconds)
        peak = mx.get_peak_memory()
        rec["peak_above_bytes"] = max(rec["peak_above_bytes"], peak - base)
        rec["peak_bytes"] = max(rec["peak_bytes"], peak)
        return out

    if step.variant.ref:
        run("reference", lambda: mx.eval(reference_logps(model, batch)))
    if step.variant.ref_big and big_batch is not None:
        run("reference_big", lambda: mx.eval(reference_logps(model, big_batch)))
    run("fwd_bwd", lambda: mx.eval(step.grads(micro)))
    _, grads = step.grads(micro)
    mx.eval(grads)
    run("optimizer", lambda: mx.eval(step.state, step.apply_update(grads)))

    run("step", lambda: mx.eval(step.state, step(micro)))


def gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul rate of MLX's BLAS in this process, GFLOP/s."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = min(timed(lambda: mx.eval(a @ b))[0] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def step0_numbers(model, batch, cfg) -> dict:
    """The numbers the torch side must reproduce: policy log-probs at init, the loss and the
    LoRA gradient norms of the first step."""
    loss_kwargs = cfg.loss_kwargs()
    logps, _ = trainer.forward_logps(model, batch)
    (loss, _), grads = nn.value_and_grad(
        model, lambda m: trainer.batch_loss(m, batch, loss_kwargs)
    )(model)
    flat = dict(tree_flatten(grads))
    mx.eval(logps, loss, flat)
    return {
        "policy_logps": np.array(logps).tolist(),
        "loss": loss.item(),
        "grad_norms": {k: float(mx.linalg.norm(v).item()) for k, v in flat.items()},
    }


def run_worker(args) -> dict:
    spec = read_spec(args.model_dir)
    geo = Geometry(args.pairs, args.prompt_len, args.completion_len)
    cfg = train_config(args)
    names = args.variants
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    out: dict = {
        "blas": _blas.STATE.reason,
        "blas_loaded": _blas.is_fast(),
        "mlx_version": mx.__version__,
        "device": str(mx.default_device()),
    }
    mx.set_cache_limit(BIG_CACHE)
    out["gemm_peak_gflops"] = gemm_peak(512 if args.tiny else 2048)

    models: dict = {}

    def model_for(v: Variant):
        key = (v.quantize, v.compute_dtype)
        if key not in models:
            net, notes = load_model(args.model_dir, v.quantize, v.compute_dtype)
            models[key] = (net, notes)
        return models[key][0]

    base = model_for(VARIANTS[names[0]])
    _, batch = make_batch(geo, spec.vocab_size, args.seed)
    refs = np.array(reference_logps(base, batch)).reshape(2, -1)
    pairs, batch = make_batch(geo, spec.vocab_size, args.seed, refs)
    micro = {}
    for name in names:
        k = VARIANTS[name].streams
        if k == 1:
            micro[name] = [batch]
        else:  # the pairs split over k micro-batches (as --grad-accumulation-steps k would)
            split = np.array_split(np.arange(len(pairs)), k)
            micro[name] = [
                data.collate(
                    [pairs[i] for i in idx], ref_chosen=refs[0][idx], ref_rejected=refs[1][idx]
                )
                for idx in split
            ]
    big = None
    if args.ref_batch_pairs and args.ref_batch_pairs != args.pairs:
        big_geo = Geometry(args.ref_batch_pairs, args.prompt_len, args.completion_len)
        _, big = make_batch(big_geo, spec.vocab_size, args.seed + 1)

    lora_init = {}
    steps: dict = {}
    own: dict = {}  # bytes of the variant's own model and optimizer state
    for name in names:
        v = VARIANTS[name]
        net = model_for(v)
        if not any(isinstance(m, model_lib.ADAPTER_LAYERS) for _, m in net.named_modules()):
            model_lib.apply_adapters(net, cfg, seed=args.seed)
            mx.eval(net.parameters())
            if not lora_init:  # lora_a's random init, for the torch side
                lora_init = dict(tree_flatten(net.trainable_parameters()))
                if args.lora_out:
                    mx.save_safetensors(args.lora_out, lora_init)
                out["step0"] = step0_numbers(net, batch, cfg)
                if cpu_kernels.enabled():  # the opted-out step must match torch too
                    with exact_exp(net):
                        out["step0_exact_exp"] = step0_numbers(net, batch, cfg)
        with variant_context(v, net):
            steps[name] = Step(net, cfg, v)
        own[name] = sum(a.nbytes for _, a in tree_flatten(net.parameters()))
        own[name] += sum(a.nbytes for _, a in tree_flatten(steps[name].optimizer.state))

    records = {name: {} for name in names}
    t_warm = {}
    for name in names:  # warm-up: the first call compiles (and pays the JIT)
        v = VARIANTS[name]
        with variant_context(v, steps[name].model):
            t0 = time.perf_counter()
            for _ in range(min(args.warmup, v.warmup or args.warmup)):
                measure_phases(steps[name], micro[name], batch, big, {})
            t_warm[name] = time.perf_counter() - t0
    for r in range(args.repeats):
        for name in names:
            v = VARIANTS[name]
            if v.rounds is not None and r >= v.rounds:
                continue
            with variant_context(v, steps[name].model):
                measure_phases(steps[name], micro[name], batch, big, records[name])

    positions = batch.tokens.shape[1] - 1
    results = {}
    for name in names:
        v = VARIANTS[name]
        scored = batch.positions.shape[1] if v.logps == "lean" else positions
        fl = step_flops(spec, geo.rows, positions, scored, cfg.lora_rank)
        res = {"note": v.note, "warmup_s": t_warm[name], "flops": fl}
        for phase, rec in records[name].items():
            n_pairs = args.ref_batch_pairs if phase == "reference_big" else args.pairs
            res[phase] = {
                "pairs": n_pairs,
                "own_peak_mb": (own[name] + rec["peak_above_bytes"]) / 2**20,
                **summarize(rec["seconds"]),
                "peak_mb": rec["peak_bytes"] / 2**20,
                "peak_above_mb": rec["peak_above_bytes"] / 2**20,
            }
        results[name] = res
    net = models[(None, "auto")][0] if (None, "auto") in models else base
    plans = {}
    for ckpt in (False, True):
        p = memory.plan(net, replace(cfg, grad_checkpoint=ckpt), geo.row_tokens, geo.rows)
        plans["grad_ckpt" if ckpt else "default"] = {
            "total_mb": p.total_bytes / 2**20,
            "breakdown": str(p),
        }
    if args.extras:
        out["ops_ms"] = op_bench(spec, geo, args.repeats)
        out["bucketing"] = bucketing_stats(args, spec.vocab_size)
        with variant_context(VARIANTS[names[0]], steps[names[0]].model):  # it traces again
            out["new_shape"] = new_shape_cost(steps[names[0]], geo, spec, args)
    out.update(
        {
            "notes": models[next(iter(models))][1],
            "batch": {
                "pairs": geo.pairs,
                "rows": geo.rows,
                "T": int(batch.tokens.shape[1]),
                "completion_positions": int(batch.positions.shape[1]),
                "tokens": int(batch.n_tokens),
            },
            "results": results,
            "memory_plan": plans,
            "weights_mb": sum(v.nbytes for _, v in tree_flatten(base.parameters())) / 2**20,
        }
    )
    return out


if __name__ == "__main__":
    sys.exit("run through bench.py")


def op_bench(spec, geo, repeats: int) -> dict:
    """Single ops at the step's shapes: MLX's own, mx.compile'd, and mlx_dpo.cpu_kernels'."""
    rows, T = geo.rows, geo.row_tokens - 1
    d, h, hd = spec.hidden_size, spec.num_attention_heads, spec.head_dim
    n_scored = rows * geo.completion_len
    x_vocab = mx.random.normal((n_scored, min(spec.vocab_size, 32000)))
    x_inter = mx.random.normal((rows, T, spec.intermediate_size))
    x_up = mx.random.normal(x_inter.shape)
    scores = mx.random.normal((rows, h, T, T))
    hidden = mx.random.normal((rows, T, d))
    w_norm = mx.ones((d,))
    q = mx.random.normal((rows, h, T, hd))
    kv = mx.random.normal((rows, spec.num_key_value_heads, T, hd))
    mx.eval(x_vocab, x_inter, x_up, scores, hidden, w_norm, q, kv)

    def rms(x, w):
        return w * x * mx.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)

    def kernels_softmax(s):  # as cpu_kernels' attention computes a block's probabilities
        e = cpu_kernels.exp(s - s.max(axis=-1, keepdims=True))
        return e * (1.0 / e.sum(axis=-1, keepdims=True))

    def sdpa_grad(fn):
        def f(q, k, v):
            return (fn(q, k, v) * q).sum()

        return mx.grad(f, argnums=(0, 1, 2))

    compiled_exp, compiled_rms = mx.compile(mx.exp), mx.compile(rms)
    ref_sdpa = functools.partial(
        mx.fast.scaled_dot_product_attention, scale=hd**-0.5, mask="causal"
    )
    kernels_sdpa = functools.partial(
        cpu_kernels.scaled_dot_product_attention, cache=None, scale=hd**-0.5, mask="causal"
    )
    cases = {
        f"exp {tuple(x_vocab.shape)}": {
            "mx.exp": lambda: mx.exp(x_vocab),
            "compiled mx.exp": lambda: compiled_exp(x_vocab),
            "cpu_kernels.exp": lambda: cpu_kernels.exp(x_vocab),
        },
        f"logsumexp {tuple(x_vocab.shape)}": {
            "mx.logsumexp": lambda: mx.logsumexp(x_vocab, axis=-1),
            "cpu_kernels.logsumexp": lambda: cpu_kernels.logsumexp(x_vocab),
        },
        f"softmax {tuple(scores.shape)}": {
            "mx.softmax": lambda: mx.softmax(scores, axis=-1, precise=True),
            "with cpu_kernels.exp": lambda: kernels_softmax(scores),
        },
        f"silu(a)*b {tuple(x_inter.shape)}": {
            "nn.silu (uncompiled)": lambda: nn.silu(x_inter) * x_up,
            "mlx-lm swiglu (compiled)": lambda: _swiglu()(x_inter, x_up),
            "cpu_kernels.swiglu": lambda: cpu_kernels.swiglu(x_inter, x_up),
        },
        f"rms_norm {tuple(hidden.shape)}": {
            "mx.fast.rms_norm": lambda: mx.fast.rms_norm(hidden, w_norm, 1e-6),
            "composed": lambda: rms(hidden, w_norm),
            "composed, compiled": lambda: compiled_rms(hidden, w_norm),
        },
        f"sdpa fwd+bwd q{tuple(q.shape)} kv{tuple(kv.shape)}": {
            "mx.fast.sdpa (CPU fallback)": lambda: sdpa_grad(ref_sdpa)(q, kv, kv),
            "cpu_kernels (flash)": lambda: sdpa_grad(kernels_sdpa)(q, kv, kv),
        },
    }
    out = {}
    for case, fns in cases.items():
        res = {}
        for _ in range(repeats + 1):  # the first round warms up (and JIT-compiles)
            for name, fn in fns.items():
                seconds, _ = timed(lambda fn=fn: mx.eval(fn()))
                res.setdefault(name, []).append(seconds)
        out[case] = {name: min(s[1:]) * 1e3 for name, s in res.items()}
    return out


def new_shape_cost(step: Step, geo: Geometry, spec, args) -> dict:
    """What a batch of a new padded length costs in its first step (the compiled step traces
    again) against the steady state; why batches are bucketed and padded to a multiple of 32."""
    out = {}
    for extra in (32, 64):
        g = Geometry(geo.pairs, geo.prompt_len, geo.completion_len + extra)
        _, b = make_batch(g, spec.vocab_size, args.seed, refs=np.zeros((2, geo.pairs)))
        micro = [b]
        times = []
        for _ in range(3):
            seconds, _ = timed(lambda m=micro: mx.eval(step.state, step.grads(m)))
            times.append(seconds)
        out[f"T={b.tokens.shape[1]}"] = {
            "first_ms": times[0] * 1e3,
            "steady_ms": min(times[1:]) * 1e3,
        }
    return out


def _swiglu():
    from mlx_lm.models.activations import swiglu

    return swiglu


def bucketing_stats(args, vocab: int) -> dict:
    """Padding and distinct shapes of one epoch of 256 pairs with spread-out lengths: length-
    bucketed (data.eval_batches: length order) vs random batches, padded to 32 or not at all."""
    rng = np.random.default_rng(args.seed)
    n = 256
    prompt = rng.integers(16, 384, n)
    chosen, rejected = rng.integers(8, 256, n), rng.integers(8, 256, n)
    pairs = [
        data.PreferencePair([1] * int(p), [2] * int(c), [3] * int(r), "synthetic", "")
        for p, c, r in zip(prompt, chosen, rejected, strict=True)
    ]
    b = args.pairs

    def stats(batches):
        real = sum(bt.n_tokens for bt in batches)
        padded = sum(int(np.prod(bt.tokens.shape)) for bt in batches)
        shapes = {(bt.tokens.shape[1], bt.positions.shape[1]) for bt in batches}
        return {"padding_fraction": 1 - real / padded, "distinct_shapes": len(shapes)}

    bucketed = list(data.eval_batches(pairs, b))
    order = rng.permutation(n)
    random32 = [data.collate([pairs[i] for i in order[k : k + b]]) for k in range(0, n, b)]
    random1 = [data.collate([pairs[i] for i in order[k : k + b]], pad_to=1) for k in range(0, n, b)]
    return {
        "pairs": n,
        "batch_pairs": b,
        "length-bucketed, pad to 32 (mlx_dpo)": stats(bucketed),
        "random batches, pad to 32": stats(random32),
        "random batches, no rounding": stats(random1),
    }
