"""One grid point, TRL side: TRL's DPOTrainer on the same checkpoint and the same token ids.

Run by grid.py with the benchmark venv's python (TRL, peft and torch==2.13.0 live there, never
in the project's dependencies):

  .bench-venv/bin/python benchmarks/grid_trl.py MODEL_DIR --pairs B --length T
      [--precompute] [--warmup 2] [--steps 3] --json OUT

The checkpoint has no tokenizer, so a word-level one maps "t<id>" to <id> (and "<eos>" to 0):
the text dataset TRL tokenizes is the synthetic token ids of common.synthetic_token_ids, the
completion's last token replaced by EOS (TRL appends one). LoRA r=8, alpha=160 (scale 20) on
q/k/v/o/gate/up/down, sigmoid loss, beta 0.1, fp32 on the CPU (bf16=False: TRL 1.16 defaults to
bf16 autocast), TRL's defaults otherwise (gradient checkpointing on, its reference forward
every step, or precompute_ref_log_probs=True). Marginal seconds per update
are the gaps between on_step_end callbacks after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import LORA_KEYS, Geometry, marginal_step_times, read_spec, synthetic_token_ids  # noqa: E402


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"t{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def dataset(geo: Geometry, vocab: int, n_batches: int):
    from datasets import Dataset

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for seed in range(n_batches):
        prompts, chosen, rejected = synthetic_token_ids(geo, vocab, seed)
        for p, c, r in zip(prompts, chosen, rejected, strict=True):
            text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
            rows["prompt"].append(text(p) + " ")
            rows["chosen"].append(text(c[:-1]) + " <eos>")
            rows["rejected"].append(text(r[:-1]) + " <eos>")
    return Dataset.from_dict(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--precompute", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    spec = read_spec(args.model_dir)
    half = args.length // 2
    geo = Geometry(args.pairs, half, args.length - half)
    total = args.warmup + args.steps
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    marks: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.pairs,
            max_steps=total,
            learning_rate=1e-5,
            beta=0.1,
            bf16=False,  # fp32 like the other side (TRL's default autocasts to bf16)
            max_length=None,
            precompute_ref_log_probs=args.precompute,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=10**6,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset(geo, spec.vocab_size, total),
            processing_class=word_tokenizer(spec.vocab_size),
            peft_config=LoraConfig(
                r=8,
                lora_alpha=160,
                lora_dropout=0.0,
                target_modules=[k.split(".")[-1] for k in LORA_KEYS],
            ),
            callbacks=[Timer()],
        )
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    out = {
        **marginal_step_times(marks, args.warmup),
        "train_s": train_s,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_average": list(os.getloadavg()),
    }
    Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
