"""One grid point, mlx-lm-lora side: its DPO trainer (train_dpo) on the same checkpoint and ids.

Run by grid.py with the benchmark venv's python (mlx-lm-lora 5.10.2 lives there):

  .bench-venv/bin/python benchmarks/grid_lora.py MODEL_DIR --pairs B --length T
      [--quantize 4] [--warmup 2] [--steps 3] --json OUT

For fairness the venv's fast BLAS (the mkl wheel's libmkl_rt) is loaded before mlx.core as
mlx_dpo does, and since mlx-lm-lora reads mx.device_info()["max_recommended_working_set_size"]
(a Metal key) the shim adds that one key (the machine's RAM) off Metal. LoRA r=8, scale 20 on
q/k/v/o/gate/up/down, sigmoid loss, beta 0.1, AdamW; the reference is a second copy of the model
run every step, as mlx-lm-lora does. Marginal seconds per update are the gaps between its
per-step loss reports after warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def preload_blas() -> str | None:
    for path in sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*"))):
        os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return path
    return None


BLAS = preload_blas()
import mlx.core as mx  # noqa: E402
from common import LORA_KEYS, Geometry, marginal_step_times, synthetic_token_ids  # noqa: E402


def shim_device_info() -> None:
    """The one key mlx-lm-lora reads, off Metal; and a no-op wired limit where there is none."""
    original = mx.device_info
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def device_info():
        info = dict(original())
        info.setdefault("max_recommended_working_set_size", ram)
        return info

    mx.device_info = device_info
    try:
        mx.set_wired_limit(0)
    except (RuntimeError, ValueError):
        mx.set_wired_limit = lambda *_: 0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--quantize", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    shim_device_info()
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    def load():
        m, _ = load_model(Path(args.model_dir))
        if args.quantize:
            nn.quantize(m, group_size=64, bits=args.quantize)
        return m

    model, ref = load(), load()
    model.freeze()
    ref.freeze()
    lora = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": list(LORA_KEYS)}
    linear_to_lora_layers(model, len(model.layers), lora)
    half = args.length // 2
    geo = Geometry(args.pairs, half, args.length - half)
    total = args.warmup + args.steps
    rows = []
    for seed in range(total):
        prompts, chosen, rejected = synthetic_token_ids(geo, model.args.vocab_size, seed)
        for pr, c, r in zip(prompts, chosen, rejected, strict=True):
            rows.append(
                {"chosen": pr + c, "rejected": pr + r, "chosen_prompt_length": len(pr),
                 "rejected_prompt_length": len(pr)}
            )  # fmt: skip
    marks: list[float] = []

    class Timer(TrainingCallback):
        def on_train_loss_report(self, info):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        targs = DPOTrainingArgs(
            batch_size=args.pairs, iters=total, steps_per_report=1, steps_per_eval=10**6,
            steps_per_save=10**6, max_seq_length=args.length + 8,
            adapter_file=str(Path(tmp) / "adapters.safetensors"), beta=0.1,
        )  # fmt: skip
        t0 = time.perf_counter()
        marks.append(t0)
        train_dpo(model, ref, optim.AdamW(1e-5), rows, None, args=targs, training_callback=Timer())
    out = {
        **marginal_step_times(marks, args.warmup),
        "blas": BLAS,
        "peak_mlx_bytes": mx.get_peak_memory(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_average": list(os.getloadavg()),
    }
    Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
