"""`mlx_dpo fuse`: the fused model's logits equal base + adapter, and it loads as a plain model.

The expectation is always computed without our fuse code: mlx-lm's own `load(adapter_path=)`
for the adapter model, and for a re-quantized layer the float weight W + scale * (A B)^T built
from adapters.safetensors by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from tiny import build_tiny_model, make_adapter, quiet

from mlx_dpo import model as model_lib
from mlx_dpo.cli import main
from mlx_dpo.export import fuse, quantization_config

TOKENS = mx.array([[5, 17, 33, 2, 90, 120, 7, 250, 64, 3]])


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))


def adapter_logits(base: Path, adapter: Path) -> np.ndarray:
    model, _ = mlx_lm.load(str(base), adapter_path=str(adapter))
    return logits(model)


def fused_logits(path: Path) -> np.ndarray:
    model, _ = mlx_lm.load(str(path))
    return logits(model)


def weights_of(path: Path) -> dict[str, mx.array]:
    out = {}
    for file in sorted(path.glob("model*.safetensors")):
        out.update(mx.load(str(file)))
    return out


@pytest.fixture(scope="module")
def quantized_base(tiny_model_path, tmp_path_factory) -> Path:
    """The tiny Qwen2 model stored 4-bit (group size 64) by mlx-lm's converter."""
    from mlx_lm import convert

    path = tmp_path_factory.mktemp("q4") / "model"
    convert(str(tiny_model_path), str(path), quantize=True, q_group_size=64, q_bits=4)
    return path


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_fused_logits_equal_adapter_logits(
    arch, fine_tune_type, tiny_model_path, tiny_llama_path, tmp_path
):
    base = tiny_model_path if arch == "qwen2" else tiny_llama_path
    adapter = make_adapter(base, tmp_path / "adapter", fine_tune_type=fine_tune_type)
    out = fuse(str(base), adapter, tmp_path / "fused", log=quiet)
    expected = adapter_logits(base, adapter)
    assert np.abs(fused_logits(base) - expected).max() > 0.1  # the adapter does change the logits
    np.testing.assert_allclose(fused_logits(out), expected, atol=1e-4, rtol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    assert not any("lora" in k for k in weights_of(out))
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }


def test_untouched_weights_are_copied_bit_for_bit(tiny_model_path, tmp_path):
    adapter = make_adapter(tiny_model_path, tmp_path / "adapter", num_layers=1)
    out = fuse(str(tiny_model_path), adapter, tmp_path / "fused", log=quiet)
    base, fused = weights_of(tiny_model_path), weights_of(out)
    assert set(base) == set(fused)
    changed = {k for k in base if not mx.array_equal(base[k], fused[k]).item()}
    # num_layers=1: only the last block's linear weights carry an update (biases do not)
    assert changed and all(
        k.startswith("model.layers.1.") and k.endswith(".weight") for k in changed
    )


def test_quantized_base_dequantize_is_exact(quantized_base, tmp_path):
    adapter = make_adapter(quantized_base, tmp_path / "adapter")
    out = fuse(str(quantized_base), adapter, tmp_path / "fused", dequantize=True, log=quiet)
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    weights = weights_of(out)
    assert not any(k.endswith(".scales") for k in weights)
    assert all(v.dtype == mx.float32 for v in weights.values())
    # quantized_matmul vs float matmul on the same dequantized values: float rounding only
    np.testing.assert_allclose(
        fused_logits(out), adapter_logits(quantized_base, adapter), atol=2e-4, rtol=1e-5
    )


def test_quantized_base_fuses_to_the_requantized_update(quantized_base, tmp_path):
    """Without --dequantize each adapted layer is quantize(W + scale * (A B)^T) with the base's
    group size and bits. The expectation is built here by hand from the files; its logits
    match the fused model's to float rounding. (Against base + adapter in float the logits
    differ by the re-quantization error, which on this random model is ~25% of the
    adapter's own effect: not a number to assert.)"""
    adapter = make_adapter(quantized_base, tmp_path / "adapter", std=0.1)
    out = fuse(str(quantized_base), adapter, tmp_path / "fused", log=quiet)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    base, fused = weights_of(quantized_base), weights_of(out)
    lora = mx.load(str(adapter / "adapters.safetensors"))
    scale = json.loads((adapter / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    expected, requantized = mlx_lm.load(str(quantized_base))[0], []
    for name in sorted(k[: -len(".lora_a")] for k in lora if k.endswith(".lora_a")):

        def deq(w, p=name):
            return mx.dequantize(w[p + ".weight"], w[p + ".scales"], w[p + ".biases"], 64, 4)

        a, b = np.array(lora[name + ".lora_a"]), np.array(lora[name + ".lora_b"])
        target = np.array(deq(base)) + scale * (a @ b).T  # W + scale * (A B)^T, in float
        q = mx.quantize(mx.array(target), 64, 4)
        requantized += list(
            zip((name + ".weight", name + ".scales", name + ".biases"), q, strict=True)
        )
        # and the fused weight is that float target up to rounding to the 4-bit grid (MLX
        # shifts the grid so 0 is exact: the error is up to one step, not half)
        err = np.abs(np.array(deq(fused)) - target)
        step = np.abs(np.repeat(np.array(fused[name + ".scales"]), 64, axis=1))
        assert (err <= step * (1 + 1e-3) + 1e-6).all()
        assert np.abs(target - np.array(deq(base))).max() > 3 * step.max()  # a real update
    expected.load_weights(requantized, strict=False)
    np.testing.assert_allclose(fused_logits(out), logits(expected), atol=1e-4, rtol=1e-5)


def test_quantize_at_load_records_per_layer_group_sizes(tiny_model_path, tmp_path):
    # --quantize 4 with group size 128: the 64-wide layers fall back to 64 (model.quantize_model)
    adapter = make_adapter(tiny_model_path, tmp_path / "adapter", quantize=4, q_group_size=128)
    out = fuse(
        str(tiny_model_path),
        adapter,
        tmp_path / "fused",
        quantize=4,
        q_group_size=128,
        log=quiet,
    )
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4
    assert {v["group_size"] for v in q.values() if isinstance(v, dict)} | {q["group_size"]} == {
        64,
        128,
    }
    expected = model_lib.load(
        str(tiny_model_path), quantize=4, q_group_size=128, compute_dtype="native"
    )
    model_lib.load_adapter_dir(expected.model, adapter)

    def layout(model):
        return {
            name.removesuffix(".linear"): (m.group_size, m.bits)
            for name, m in model.named_modules()
            if hasattr(m, "group_size") and not isinstance(m, model_lib.ADAPTER_LAYERS)
        }

    # mlx_lm.load rebuilds every layer with the group size it was quantized with
    assert layout(mlx_lm.load(str(out))[0]) == layout(expected.model)
    fused_dq = fuse(
        str(tiny_model_path),
        adapter,
        tmp_path / "fused-dq",
        quantize=4,
        q_group_size=128,
        dequantize=True,
        log=quiet,
    )
    np.testing.assert_allclose(fused_logits(fused_dq), logits(expected.model), atol=2e-4, rtol=1e-5)


def test_quantization_config_none_for_float_model(tiny_model_path):
    loaded = model_lib.load(str(tiny_model_path), compute_dtype="native")
    assert quantization_config(loaded.model) is None


def test_dequantized_fused_model_loads_in_transformers(tiny_model_path, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    adapter = make_adapter(tiny_model_path, tmp_path / "adapter")
    out = fuse(str(tiny_model_path), adapter, tmp_path / "fused", dequantize=True, log=quiet)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(np.array(TOKENS), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, fused_logits(out), atol=1e-3, rtol=1e-4)


def test_cli_fuse_reads_model_from_adapter_config(tiny_model_path, tmp_path):
    adapter = make_adapter(tiny_model_path, tmp_path / "adapter")
    result = CliRunner().invoke(
        main, ["fuse", "--adapter-path", str(adapter), "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "mlx_lm.load" in result.output
    np.testing.assert_allclose(
        fused_logits(tmp_path / "out"), adapter_logits(tiny_model_path, adapter), atol=1e-4
    )


def test_cli_fuse_upload(tiny_model_path, tmp_path, monkeypatch):
    import mlx_lm.utils

    calls = []
    monkeypatch.setattr(
        mlx_lm.utils, "upload_to_hub", lambda path, repo: calls.append((path, repo))
    )
    adapter = make_adapter(tiny_model_path, tmp_path / "adapter")
    out = tmp_path / "out"
    args = [
        "fuse",
        "--adapter-path",
        str(adapter),
        "--output",
        str(out),
        "--upload-repo",
        "me/tiny-dpo",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert calls == [(str(out), "me/tiny-dpo")]


def test_cli_fuse_user_errors(tiny_model_path, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(
        main,
        [
            "fuse",
            "--model",
            str(tiny_model_path),
            "--adapter-path",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert missing.exit_code == 2
    assert "no such directory" in missing.output

    small = build_tiny_model(tmp_path / "small", hidden_size=32)
    wrong = make_adapter(small, tmp_path / "small-adapter")
    misfit = runner.invoke(
        main,
        [
            "fuse",
            "--model",
            str(tiny_model_path),
            "--adapter-path",
            str(wrong),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert misfit.exit_code == 2
    assert "not adapters of this model" in misfit.output

    adapter = make_adapter(tiny_model_path, tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    taken = runner.invoke(
        main, ["fuse", "--adapter-path", str(adapter), "--output", str(tmp_path / "full")]
    )
    assert taken.exit_code == 2
    assert "not empty" in taken.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
