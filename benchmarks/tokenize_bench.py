#!/usr/bin/env python
"""Time reading and tokenizing preference pairs as `mlx_dpo train` does, at scale.

    python benchmarks/tokenize_bench.py                    # 50,000 pairs of ~600 tokens
    python benchmarks/tokenize_bench.py --pairs 2000 --baseline   # + the row-at-a-time way

No model or data set is downloaded: a byte-level BPE tokenizer (32k vocabulary, ChatML
template, as Qwen2-style models have) is trained here on Python's own docstrings, and the
pairs are spans of that text: a ~150-token question and two ~225-token answers, so prompt +
chosen + rejected is ~600 tokens. Both row kinds are timed: conversational (chat template)
and standard (plain text + EOS). Prints seconds, pairs/s and tokens/s per phase; the target
is 50k pairs tokenized in <= 15 s on a 2-core x86 machine. `--baseline` also times the former
one-row-at-a-time path (apply_chat_template and encode per text) on the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def corpus() -> list[str]:
    """Docstrings of the standard library: real English and code, offline."""
    import importlib

    texts = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in ("antigravity", "this", "idlelib", "turtledemo"):
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any module that does not import here is skipped
            continue
        for obj in list(vars(module).values()):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 100:
                texts.append(doc)
        if len(texts) > 20000:
            break
    return list(dict.fromkeys(texts))


def build_tokenizer(out: Path, texts: list[str]):
    from mlx_lm.utils import load_tokenizer

    from mlx_dpo.demo.tokenizer import write_chat_tokenizer

    write_chat_tokenizer(out, texts, 32000, model_max_length=4096)
    return load_tokenizer(out)


def make_rows(words: list[str], n: int, conversational: bool, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def span(k: int) -> str:
        i = rng.randrange(len(words) - k)
        return " ".join(words[i : i + k])

    rows = []
    for _ in range(n):
        prompt, chosen, rejected = span(115), span(170), span(170)
        if conversational:
            row = {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        else:
            row = {"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected}
        rows.append(row)
    return rows


def timed(label: str, fn, n_pairs: int, n_tokens: int | None = None):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    line = f"{label:<44} {seconds:8.2f} s"
    if n_pairs:
        line += f"  {n_pairs / seconds:9.0f} pairs/s"
    if n_tokens:
        line += f"  {n_tokens / seconds / 1e6:6.2f} M tokens/s"
    print(line, flush=True)
    return out, seconds


def baseline(rows: list[dict], tokenizer) -> None:
    """The former path: one template render and one encode call per text."""
    hf = tokenizer._tokenizer
    for r in rows:
        if isinstance(r["prompt"], list):
            texts = [
                hf.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                hf.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False),
                hf.apply_chat_template(r["prompt"] + r["rejected"], tokenize=False),
            ]
        else:
            texts = [r["prompt"], r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]]
        for t in texts:
            hf.encode(t, add_special_tokens=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50_000)
    parser.add_argument("--baseline", action="store_true", help="also time the row-at-a-time path")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from mlx_dpo import token_ids
    from mlx_dpo.data import load_splits, tokenize_rows

    texts = corpus()
    words = " ".join(texts).split()
    tmp = Path(tempfile.mkdtemp(prefix="tokenize_bench_"))
    tokenizer, _ = timed(
        "train the 32k BPE tokenizer (setup)", partial(build_tokenizer, tmp, texts), 0
    )
    print(
        f"corpus: {len(texts)} docstrings, {len(words)} words; cores: {os.cpu_count()}; "
        f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}; "
        f"encoding processes: {token_ids.workers(args.pairs)} ({token_ids.WORKERS_ENV})"
    )
    figures = {"pairs": args.pairs}
    for kind in ("conversational", "standard"):
        rows = make_rows(words, args.pairs, kind == "conversational")
        path = tmp / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        loaded, t_load = timed(
            f"{kind}: read + check rows",
            partial(load_splits, str(path), valid_fraction=0),
            args.pairs,
        )
        train = loaded["train"]
        (pairs, stats), t_tok = timed(
            f"{kind}: tokenize",
            partial(tokenize_rows, train, tokenizer, max_length=4096, progress=sys.stderr.isatty()),
            args.pairs,
        )
        n_tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        print(
            f"{'':<44} {n_tokens / len(pairs):8.0f} tokens/pair ({n_tokens / t_tok / 1e6:.2f} M tokens/s)"
        )
        figures[kind] = {
            "read_s": t_load,
            "tokenize_s": t_tok,
            "tokens_per_pair": n_tokens / len(pairs),
        }
        if args.baseline:
            _, t_base = timed(
                f"{kind}: row at a time (former path)",
                partial(baseline, train, tokenizer),
                args.pairs,
            )
            figures[kind]["baseline_s"] = t_base
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
