"""The Metal/CUDA compute path, run on this CPU at tiny sizes: a bf16 checkpoint, and the same
quantized to 4 bits and kept quantized (QuantizedLinear through mx.quantized_matmul, as on a
GPU), LoRA in float32 over bf16 activations, log-probs accumulated in float32. Checked: the
dtype of every part of the step on each platform (docs/precision.md), log-probs within bf16
tolerance of the float32 CPU path, step-1 loss ln 2, the loss falls, mlx-lm loads the adapters."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import make_cfg, quiet, read_metrics, write_pairs

from mlx_dpo import data, trainer
from mlx_dpo import model as model_lib
from mlx_dpo.logps import forward_logps
from mlx_dpo.platform import KINDS, Platform, forced
from mlx_dpo.training import run_training


@pytest.fixture(scope="module")
def bf16_model_path(tmp_path_factory):
    """The tests' tiny Qwen2 checkpoint with every weight stored in bfloat16 (as most Hub
    checkpoints are)."""
    from tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny-bf16"))
    weights = mx.load(str(path / "model.safetensors"))
    mx.save_safetensors(
        str(path / "model.safetensors"),
        {k: v.astype(mx.bfloat16) for k, v in weights.items()},
        metadata={"format": "pt"},
    )
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return path


@pytest.fixture(autouse=True)
def _no_wired_limit(monkeypatch):
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: 0)  # a fake Metal must not set it


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_pairs(d / "train.jsonl", 16)
    write_pairs(d / "valid.jsonl", 4, seed=1, offset=100)
    return d


def _load(path, kind, quantize):
    return model_lib.load(
        str(path), quantize=quantize, q_group_size=32, platform=Platform.make(kind)
    )


def _batch(loaded, toy_data):
    rows = [
        {**json.loads(line), "source": f"train.jsonl:{i + 1}"}
        for i, line in enumerate((toy_data / "train.jsonl").read_text().splitlines())
    ]
    pairs, _ = data.tokenize_rows(rows[:4], loaded.tokenizer, max_length=64)
    return next(data.eval_batches(pairs, 4, ref_chosen=np.zeros(4), ref_rejected=np.zeros(4)))


# What each part of the step is stored and computed in, per platform and checkpoint; the same
# table is in docs/precision.md. "quantized": uint32 packed weights, scales/biases as listed.
PRECISION = {
    # (gpu?, quantized?): (base float weights, activations)
    (False, False): (mx.float32, mx.float32),
    (False, True): (mx.float32, mx.float32),  # dequantized to float32 at use
    (True, False): (mx.bfloat16, mx.bfloat16),
    (True, True): (mx.bfloat16, mx.bfloat16),  # mx.quantized_matmul on the packed weights
}


@pytest.mark.parametrize("quantize", [None, 4], ids=["bf16", "4bit"])
@pytest.mark.parametrize("kind", KINDS)
def test_dtype_of_each_part_of_the_step(kind, quantize, bf16_model_path, toy_data):
    loaded = _load(bf16_model_path, kind, quantize)
    model, plat = loaded.model, Platform.make(kind)
    weights, activations = PRECISION[(plat.gpu, bool(quantize))]
    base = {k: v for k, v in tree_flatten(model.parameters()) if v.dtype != mx.uint32}
    assert {v.dtype for v in base.values()} == {weights}
    layers = {type(m) for _, m in model.named_modules()}
    if quantize:  # kept quantized on a GPU, dequantized at use on a CPU
        assert (nn.QuantizedLinear in layers) == plat.gpu
        assert (model_lib.DequantLinear in layers) == (not plat.gpu)
    cfg = make_cfg(bf16_model_path, toy_data, "unused")
    model_lib.apply_adapters(model, cfg)
    lora = dict(tree_flatten(model.trainable_parameters()))
    assert lora and {v.dtype for v in lora.values()} == {mx.float32}
    batch = _batch(loaded, toy_data)
    tokens = mx.array(batch.tokens)[:, :-1]
    assert model.model(tokens).dtype == activations  # final-normed hidden states
    logps, _ = forward_logps(model, batch)
    assert logps.dtype == mx.float32  # the head's log-softmax accumulates in float32
    optimizer = optim.AdamW(1e-3)
    optimizer.init(model.trainable_parameters())
    step = trainer.make_step(model, optimizer, cfg)  # the training step itself
    metrics, grads = step.grads([batch])
    assert metrics["loss"].dtype == mx.float32 and metrics["rewards/margins"].dtype == mx.float32
    assert {g.dtype for _, g in tree_flatten(grads)} == {mx.float32}
    mx.eval(step.state, step.update(grads))
    state = [v for _, v in tree_flatten(optimizer.state) if v.ndim > 0]
    assert state and {v.dtype for v in state} == {mx.float32}


@pytest.mark.parametrize("quantize", [None, 4], ids=["bf16", "4bit"])
def test_gpu_path_logps_within_bf16_tolerance_of_fp32(quantize, bf16_model_path, toy_data):
    """Same weights (the same 4-bit codes when quantized), bf16 activations against float32:
    per-sequence sums of ~10 tokens agree to bf16's resolution, not float32's."""
    gpu, cpu = (_load(bf16_model_path, k, quantize) for k in ("metal", "x86-cpu"))
    batch = _batch(cpu, toy_data)
    ours, exact = (np.array(forward_logps(m.model, batch)[0]) for m in (gpu, cpu))
    # bf16 keeps 8 significant bits: one rounding step is 2^-8 = 0.4% relative. Sums near -230
    # came out within 0.06% (bf16) and 0.18% (4-bit) of float32, i.e. off by 0.1-0.4 nats:
    # fine for each sum, far too coarse to take a DPO margin from bf16 sums (losses.py refuses).
    np.testing.assert_allclose(ours, exact, rtol=2**-8)
    assert not np.array_equal(ours, exact)  # it really ran in bf16


@pytest.mark.parametrize("quantize", [None, 4], ids=["bf16", "4bit"])
def test_gpu_path_trains_and_mlx_lm_loads_the_adapters(
    quantize, bf16_model_path, toy_data, tmp_path
):
    import mlx_lm

    run_dir = tmp_path / "run"
    # at 3e-3 the toy data is fit by step 2 and the margin then swings (loss up to 2.4 by
    # step 12, with either batch layout: a matter of bf16 round-off); 1e-3 fits it and stays
    cfg = make_cfg(
        bf16_model_path, toy_data, run_dir, iters=12, batch_size=4, learning_rate=1e-3,
        lr_schedule="constant", quantize=quantize, q_group_size=32,
    )  # fmt: skip
    with forced(Platform.make("metal")):
        run_training(cfg, log=quiet)
    rows = read_metrics(run_dir)
    # lora_b = 0: policy == reference, on the same bf16 path; batches are padded differently
    # for the reference pass, which bf16 matmuls may round differently.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)
    assert np.mean([r["loss"] for r in rows[-3:]]) < rows[0]["loss"] - 0.05
    saved = mx.load(str(run_dir / "adapters.safetensors"))
    assert {v.dtype for v in saved.values()} == {mx.float32}
    model, _ = mlx_lm.load(str(bf16_model_path), adapter_path=str(run_dir))
    loaded = dict(tree_flatten(model.parameters()))
    for name, value in saved.items():
        np.testing.assert_array_equal(np.array(loaded[name]), np.array(value), err_msg=name)
