"""Model loading, quantization, adapters and the Hub path (offline)."""

import math
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny import build_tiny_model, make_cfg, quiet, read_metrics

from mlx_dpo import model as model_lib
from mlx_dpo.training import run_training


def test_quantize_picks_a_group_size_that_divides(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=96)  # 96 is not a multiple of 64
    loaded = model_lib.load(str(path), quantize=4, q_group_size=64, compute_dtype="native")
    groups = {
        m.group_size for _, m in loaded.model.named_modules() if isinstance(m, nn.QuantizedLinear)
    }
    assert groups and all(96 % g == 0 or 192 % g == 0 for g in groups)
    assert any("smaller group size" in n for n in loaded.notes)
    out = loaded.model(mx.array([[1, 2, 3]]))
    assert np.isfinite(np.array(out)).all()


def test_cpu_compute_dequantizes_at_use_with_same_numbers(tiny_model_path):
    native = model_lib.load(
        str(tiny_model_path), quantize=4, q_group_size=32, compute_dtype="native"
    )
    fast = model_lib.load(
        str(tiny_model_path), quantize=4, q_group_size=32, compute_dtype="float32"
    )
    assert any(isinstance(m, model_lib.DequantLinear) for _, m in fast.model.named_modules())
    x = mx.array([[5, 9, 17, 3, 44]])
    np.testing.assert_allclose(
        np.array(native.model(x)), np.array(fast.model(x)), rtol=1e-4, atol=1e-4
    )


def test_adapters_off_gives_exact_base_outputs(tiny_model_path):
    loaded = model_lib.load(str(tiny_model_path))
    x = mx.array([[5, 9, 17, 3, 44]])
    base = np.array(loaded.model(x))
    cfg = make_cfg(tiny_model_path, "unused", "unused", fine_tune_type="dora")
    model_lib.apply_adapters(loaded.model, cfg)
    for _, m in loaded.model.named_modules():  # move the adapters away from identity
        if hasattr(m, "lora_b"):
            m.lora_b = mx.ones_like(m.lora_b) * 0.01
    assert not np.array_equal(np.array(loaded.model(x)), base)
    with model_lib.adapters_off(loaded.model):
        assert np.array_equal(np.array(loaded.model(x)), base)
    assert not np.array_equal(np.array(loaded.model(x)), base)


def test_dora_adapters_train_and_load_in_mlx_lm(tiny_model_path, tmp_path):
    import mlx_lm
    from tiny import write_pairs

    data = tmp_path / "d.jsonl"
    write_pairs(data, 24)
    run_training(
        make_cfg(tiny_model_path, data, tmp_path / "run", fine_tune_type="dora", iters=2), log=quiet
    )
    model, _ = mlx_lm.load(str(tiny_model_path), adapter_path=str(tmp_path / "run"))
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3]])))).all()


def test_init_adapter_is_part_of_the_reference(tiny_model_path, tmp_path):
    from tiny import write_pairs

    data = tmp_path / "d.jsonl"
    write_pairs(data, 24)
    run_training(make_cfg(tiny_model_path, data, tmp_path / "sft", iters=3, lora_rank=4), log=quiet)
    cfg = make_cfg(
        tiny_model_path,
        data,
        tmp_path / "dpo",
        iters=1,
        lora_rank=16,
        init_adapter=str(tmp_path / "sft"),
    )
    run_training(cfg, log=quiet)
    # the reference includes the SFT adapter, so the policy starts equal to it: ln 2 exactly
    assert read_metrics(tmp_path / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    adapters = mx.load(str(tmp_path / "dpo" / "adapters.safetensors"))
    assert (
        next(v for k, v in adapters.items() if k.endswith("lora_a")).shape[-1] == 4
    )  # rank adopted


def test_ref_model_is_used_when_given(tiny_model_path, tmp_path):
    from tiny import write_pairs

    data = tmp_path / "d.jsonl"
    write_pairs(data, 24)
    other = build_tiny_model(tmp_path / "other", seed=7)
    run_training(
        make_cfg(tiny_model_path, data, tmp_path / "run", iters=1, ref_model=str(other)), log=quiet
    )
    assert abs(read_metrics(tmp_path / "run")[0]["loss"] - math.log(2)) > 1e-3


def test_grad_checkpoint_gives_the_same_adapters(tiny_model_path, tmp_path):
    from tiny import write_pairs

    data = tmp_path / "d.jsonl"
    write_pairs(data, 24)
    run_training(make_cfg(tiny_model_path, data, tmp_path / "a", iters=2), log=quiet)
    run_training(
        make_cfg(tiny_model_path, data, tmp_path / "b", iters=2, grad_checkpoint=True), log=quiet
    )
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_hub_model_id_resolves_from_local_cache_offline(tiny_model_path, tmp_path):
    from tiny import write_pairs

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--mlx-dpo-test--tiny"
    shutil.copytree(tiny_model_path, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    data = tmp_path / "d.jsonl"
    write_pairs(data, 24)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "mlx_dpo",
        "train",
        "--model",
        "mlx-dpo-test/tiny",
        "--data",
        str(data),
    ]
    cmd += ["--adapter-path", str(tmp_path / "run"), "--iters", "1", "--no-reference-cache"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "adapters.safetensors").exists()
    absent = [a.replace("mlx-dpo-test/tiny", "mlx-dpo-test/absent") for a in cmd]
    absent[absent.index(str(tmp_path / "run"))] = str(tmp_path / "run2")
    missing = subprocess.run(absent, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert "not in the local Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_quantizing_at_load_leaves_no_float_weights_in_the_cache(tiny_model_path):
    # on the CPU training raises MLX's cache limit to 8 GB: the float weights freed by the
    # quantization must go back to the OS, not stay resident as cached buffers
    previous = mx.set_cache_limit(8 << 30)
    try:
        mx.clear_cache()
        loaded = model_lib.load(str(tiny_model_path), quantize=4, q_group_size=32)
        mx.eval(loaded.model.parameters())
        float_bytes = sum(
            a.nbytes for a in mx.load(str(tiny_model_path / "model.safetensors")).values()
        )
        assert mx.get_cache_memory() < float_bytes / 4
    finally:
        mx.set_cache_limit(previous)


def test_grad_checkpoint_keeps_one_blocks_dequantized_weights(tmp_path):
    # A quantized block's float32 weights are rebuilt at use; with --grad-checkpoint the
    # backward rebuilds them again, so a compiled step holds one block's copies, not all 8.
    path = build_tiny_model(tmp_path / "m", hidden_size=256, num_layers=8)
    net = model_lib.load(
        str(path), quantize=4, q_group_size=64, compute_dtype="float32", share_prompt=False
    ).model
    model_lib.apply_adapters(net, make_cfg(path, "unused", "unused"))
    model_lib.enable_grad_checkpoint(net)
    quantized = [m for _, m in net.layers[0].named_modules() if isinstance(m, nn.QuantizedLinear)]
    block_bytes = sum(4 * m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits for m in quantized)

    def loss(params, ids):
        net.update(params)
        return net(ids).astype(mx.float32).sum()

    step = mx.compile(mx.value_and_grad(loss))
    params, ids = net.trainable_parameters(), mx.array([list(range(1, 33))])
    mx.eval(step(params, ids))
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(step(params, ids))
    assert mx.get_peak_memory() - before < 3 * block_bytes
