"""Build the bundled demo model and preference data from scratch: `python examples/build_demo.py`.

Writes mlx_dpo/demo/model/ (a 4-bit Llama-architecture chat model with a byte-level BPE
tokenizer and a ChatML template, in mlx-lm's format) and mlx_dpo/demo/data/{train,valid}.jsonl.
The task is in `demo_task.py`, the rule that scores it in `mlx_dpo.demo`. Everything is seeded:
a rerun writes the same files, up to MLX CPU float reproducibility. Takes a few minutes on a
2-core CPU; the last lines printed are the base model's behaviour on the held-out prompts
(about half helpful, half evasive, almost never wrong).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

# Run from a checkout: import this repo's mlx_dpo (and write into its demo/), and demo_task.py.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import mlx_dpo  # noqa: E402  (loads a fast BLAS; must run before anything imports mlx.core)

BLAS = mlx_dpo._blas.STATE  # a statement here keeps the import sorter from moving the line down

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from demo_task import all_facts, conversations, preference_rows, split_facts  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

from mlx_dpo.demo import DEMO_DIR, is_preferred, sample_answers  # noqa: E402
from mlx_dpo.demo.tokenizer import write_chat_tokenizer  # noqa: E402

SEED = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEMO_DIR, help="demo directory to write")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument(
        "--vocab", type=int, default=512, help="BPE vocabulary cap (the corpus fills ~430)"
    )
    p.add_argument("--steps", type=int, default=1000, help="pretraining optimizer steps")
    p.add_argument("--batch", type=int, default=64, help="conversations per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--prompt-weight", type=float, default=0.1, help="loss weight of user turns")
    p.add_argument("--qat-steps", type=int, default=300, help="final quantization-aware steps")
    p.add_argument("--group-size", type=int, default=64, help="4-bit quantization group size")
    return p.parse_args()


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> tuple[int, int]:
    """Byte-level BPE with ChatML specials (eos = <|im_end|>); returns (vocab size, eos id).

    GPT-2's pre-tokenizer split keeps numbers whole ("12" is one token), so an answer cannot
    run on digit by digit. (This is also why the model is a Llama: transformers 5 loads any
    "qwen2" checkpoint with Qwen2's digit-by-digit split, whatever tokenizer.json says.)
    """
    tok = write_chat_tokenizer(out, texts, vocab_size)
    return tok.get_vocab_size(), tok.token_to_id("<|im_end|>")


def model_config(args: argparse.Namespace, n_tokens: int, eos_id: int) -> dict:
    # Pad the vocabulary to a multiple of 64 like real checkpoints (and the quantization groups).
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 64 * math.ceil(n_tokens / 64),
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": eos_id,
    }


def encode(tok_dir: Path, convs: list[tuple[str, str]]):
    """Load the tokenizer as mlx-lm does; return it and, for each conversation, its token ids
    and where the assistant answer starts. Raises if mlx-lm's tokenizer splits any text
    differently from tokenizer.json itself."""
    from mlx_lm.utils import load_tokenizer
    from tokenizers import Tokenizer

    tokenizer = load_tokenizer(tok_dir)
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    rows = []
    for q, a in convs:
        user = [{"role": "user", "content": q}]
        full = [*user, {"role": "assistant", "content": a}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        text = tokenizer.apply_chat_template(full, tokenize=False)
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if tokens != raw.encode(text).ids:
            raise RuntimeError(f"mlx-lm's tokenizer splits {text!r} unlike tokenizer.json")
        rows.append((tokens, len(tokenizer.encode(prompt, add_special_tokens=False))))
    return tokenizer, rows


def batches(rows, batch: int, pad_id: int, prompt_weight: float, rng: np.random.Generator):
    """Endless shuffled epochs of (tokens, loss weights), right-padded to the batch's longest."""
    while True:
        order = rng.permutation(len(rows))
        for start in range(0, len(order) - batch + 1, batch):
            chunk = [rows[i] for i in order[start : start + batch]]
            width = max(len(tokens) for tokens, _ in chunk)
            tokens = np.full((batch, width), pad_id, dtype=np.int32)
            weights = np.zeros((batch, width - 1), dtype=np.float32)
            for r, (row, answer_start) in enumerate(chunk):
                tokens[r, : len(row)] = row
                weights[r, : answer_start - 1] = prompt_weight
                weights[r, answer_start - 1 : len(row) - 1] = 1.0
            yield mx.array(tokens), mx.array(weights)


def fake_quant(params, group: int):
    """4-bit round trip of every matrix the saved model quantizes, with a straight-through
    gradient: the forward sees the weights the checkpoint will hold, the update goes to the
    float weights."""

    def one(w):
        if w.ndim != 2 or w.shape[-1] % group:
            return w
        q = mx.dequantize(*mx.quantize(w, group_size=group, bits=4), group_size=group, bits=4)
        return w + mx.stop_gradient(q - w)

    return tree_map(one, params)


def make_step(model: nn.Module, opt, group: int | None):
    """A compiled AdamW step on the masked next-token loss; with `group`, quantization-aware."""

    def loss_fn(model, tokens, weights):
        if group is not None:
            latent = model.trainable_parameters()
            model.update(fake_quant(latent, group))
        logits = model(tokens[:, :-1])
        if group is not None:
            model.update(latent)  # the optimizer must update the float weights, not their copy
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="none")
        return (ce * weights).sum() / weights.sum()

    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, weights):
        loss, grads = grad_fn(model, tokens, weights)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    return step, state


def pretrain(model: nn.Module, rows, pad_id: int, args) -> None:
    """Next-token training, AdamW with warm-up then cosine decay. The last `qat_steps` train
    through the 4-bit round trip: a model this small can lose its arithmetic to quantization
    noise, and which run does is luck unless the weights are tuned for it."""
    warmup = max(1, args.steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, args.lr, warmup), optim.cosine_decay(args.lr, args.steps)],
        [warmup],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    float_step = make_step(model, opt, None)
    qat_step = make_step(model, opt, args.group_size)
    data = batches(rows, args.batch, pad_id, args.prompt_weight, np.random.default_rng(SEED))
    tic, running = time.perf_counter(), 0.0
    for it in range(1, args.steps + 1):
        step, state = qat_step if it > args.steps - args.qat_steps else float_step
        loss = step(*next(data))
        mx.eval(state, loss)
        running += loss.item()
        if it % 100 == 0 or it == args.steps:
            print(f"step {it:5d}  loss {running / 100:.4f}  {time.perf_counter() - tic:.0f}s")
            running = 0.0


def save_quantized(model: nn.Module, config: dict, tok_dir: Path, model_dir: Path, group: int):
    """4-bit affine quantization of every linear layer and the (tied) embedding, mlx-lm layout."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = quantize_model(model, config, group_size=group, bits=4)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    save_model(model_dir, model)
    save_config(config, model_dir / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, model_dir / name)


def write_data(data_dir: Path) -> tuple[int, int]:
    """train.jsonl: every wording of the train facts; valid.jsonl: two of each held-out fact."""
    train_facts, valid_facts = split_facts(SEED)
    splits = {
        "train": preference_rows(train_facts, SEED),
        "valid": preference_rows(valid_facts, SEED + 1, per_fact=2),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        for r in rows:  # the shipped rule must agree with the labels
            chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
            if not is_preferred(chosen, r["prompt"]) or is_preferred(rejected, r["prompt"]):
                raise RuntimeError(f"is_preferred disagrees with the pair {r}")
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        (data_dir / f"{name}.jsonl").write_text(lines)
    return len(splits["train"]), len(splits["valid"])


def check(model_dir: Path, data_dir: Path) -> None:
    """Load the written model as a user would and sample it on the held-out prompts: it should
    answer about half helpfully and half evasively, and (almost) never wrongly or garbled."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(model_dir))
    dequantize_model(model)  # the same function in float32; the CPU's quantized matmul is slow
    rows = [json.loads(line) for line in (data_dir / "valid.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    n = 4
    for temp in (1.0, 0.7):
        answers = sample_answers(model, tokenizer, prompts, n=n, temp=temp, seed=SEED)
        asked = [p for p in prompts for _ in range(n)]
        helpful = sum(map(is_preferred, answers, asked)) / len(answers)
        evasive = sum(a.startswith("Sorry") for a in answers) / len(answers)
        print(
            f"base model, {len(answers)} answers to held-out prompts at temp {temp}: "
            f"{helpful:.1%} preferred, {evasive:.1%} evasive, {1 - helpful - evasive:.1%} other"
        )
    for prompt, answer in zip(prompts[:6], answers[: 6 * n : n], strict=True):
        print(f"  {prompt[-1]['content']!r} -> {answer!r}")


def main() -> None:
    args = parse_args()
    mx.random.seed(SEED)
    mx.set_cache_limit(4 << 30)
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config

    convs = conversations(all_facts())
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        # Role names in the texts so "user"/"assistant" become single tokens, as in real vocabs.
        texts = [f"user\n{q}\nassistant\n{a}" for q, a in convs]
        n_tokens, eos_id = train_tokenizer(texts, args.vocab, tok_dir)
        config = model_config(args, n_tokens, eos_id)
        save_config(dict(config), tok_dir / "config.json")  # the loader picks classes from it
        tokenizer, rows = encode(tok_dir, convs)
        model = llama.Model(llama.ModelArgs.from_dict(config))
        n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
        print(BLAS.reason)
        print(f"{len(convs)} conversations, vocab {n_tokens}, {n_params / 1e3:.0f}k params")
        pretrain(model, rows, tokenizer.pad_token_id, args)
        save_quantized(model, config, tok_dir, args.out / "model", args.group_size)
    n_train, n_valid = write_data(args.out / "data")
    print(f"wrote {args.out}: {n_train} train and {n_valid} valid pairs")
    check(args.out / "model", args.out / "data")


if __name__ == "__main__":
    main()
