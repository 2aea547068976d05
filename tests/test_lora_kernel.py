"""The CPU path's fused LoRA adapter (mlx_dpo.lora_kernel): torch's numbers and gradients, the
same results as mlx-lm's LoRALinear through the dispatcher, and less memory."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.tuner.lora import LoRALinear

from mlx_dpo import cpu_kernels, lora_kernel
from mlx_dpo import kernel_choice as kc


def _arrays(bias: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = {"x": (2, 5, 16), "w": (12, 16), "a": (16, 4), "b": (4, 12), "ct": (2, 5, 12)}
    if bias:
        shapes["bias"] = (12,)
    return {k: mx.array(rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()}


@pytest.mark.torch
@pytest.mark.parametrize("bias", [False, True])
def test_fused_adapter_values_and_gradients_match_torch(bias):
    import torch

    v, scale = _arrays(bias), 2.5
    extra = [v["bias"]] if bias else []

    def f(x, a, b):
        y = lora_kernel.fused(scale, bias)(x, v["w"], a, b, *extra)[0]
        return (y * v["ct"]).sum(), y

    (_, y), grads = mx.value_and_grad(f, argnums=(0, 1, 2))(v["x"], v["a"], v["b"])
    t = {k: torch.tensor(np.array(a), dtype=torch.float64) for k, a in v.items()}
    for k in ("x", "a", "b"):
        t[k].requires_grad_(True)
    want = t["x"] @ t["w"].T + scale * (t["x"] @ t["a"]) @ t["b"]
    want = want + t["bias"] if bias else want
    (want * t["ct"]).sum().backward()
    np.testing.assert_allclose(np.array(y), want.detach().numpy(), rtol=1e-5, atol=1e-5)
    for got, k in zip(grads, ("x", "a", "b"), strict=True):
        assert got.shape == tuple(t[k].shape)
        np.testing.assert_allclose(np.array(got), t[k].grad.numpy(), rtol=1e-5, atol=1e-4)


def _adapter(base: nn.Module, dropout: float = 0.0) -> LoRALinear:
    layer = LoRALinear.from_base(base, r=4, scale=3.0, dropout=dropout)
    layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(5)) * 0.2
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    return layer


def _value_and_grads(layer: LoRALinear, x: mx.array):
    def loss(model, x):
        return (model(x) ** 2).sum()

    def loss_x(x):
        return (layer(x) ** 2).sum()

    value, grads = nn.value_and_grad(layer, loss)(layer, x)
    return value, grads["lora_a"], grads["lora_b"], mx.grad(loss_x)(x)


def _bases():
    from mlx_dpo.model import DequantLinear

    quantized = nn.QuantizedLinear.from_linear(nn.Linear(64, 48), group_size=32, bits=4)
    quantized.__class__ = DequantLinear  # the CPU path's float32 compute over 4-bit storage
    return {"linear": nn.Linear(64, 48, bias=False), "bias": nn.Linear(64, 48), "4-bit": quantized}


@pytest.mark.parametrize("winner", ["fused", "mlx"])
@pytest.mark.parametrize("base", ["linear", "bias", "4-bit"])
def test_dispatcher_gives_mlx_lm_numbers_and_runs_what_was_measured(base, winner, monkeypatch):
    layer = _adapter(_bases()[base])
    x = mx.random.normal((2, 7, 64), key=mx.random.key(1))
    lora_kernel.use(False)
    want = _value_and_grads(layer, x)
    calls = []
    real = lora_kernel.fused
    monkeypatch.setattr(lora_kernel, "fused", lambda *a: calls.append(a) or real(*a))

    def fake_measure(fns):
        return {name: [1.0 if name == winner else 2.0] for name in fns}

    kc.reset(kc.Chooser(None, report=lambda _: None, measure_fn=fake_measure))
    lora_kernel.use(True)
    try:
        got = _value_and_grads(layer, x)
    finally:
        lora_kernel.use(cpu_kernels.enabled())
        kc.reset()
    assert any(c[0] == layer.scale for c in calls) == (winner == "fused")  # not the timing's
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-5, atol=1e-4)


def test_dropout_and_other_dtypes_stay_with_mlx_lm(monkeypatch):
    calls = []
    monkeypatch.setattr(lora_kernel, "fused", lambda *a: calls.append(a))
    with kc.pinned({"lora": "fused"}):
        lora_kernel.call(_adapter(nn.Linear(8, 6), dropout=0.1), mx.ones((3, 8)))
        half = _adapter(nn.Linear(8, 6))
        half.set_dtype(mx.float16)
        lora_kernel.call(half, mx.ones((3, 8), dtype=mx.float16))
        quantized = _adapter(nn.QuantizedLinear(64, 32, group_size=32, bits=4))  # Metal's kernel
        lora_kernel.call(quantized, mx.ones((3, 64)))
    assert calls == []


def test_fused_backward_holds_an_activation_less():
    """mlx-lm's adapter writes out scale * dy and the adapter's dx beside the frozen dx; the
    fused one accumulates into the GEMM's output (peak: 4.5 against 3.3 outputs' size)."""
    T, d_in, d_out, r = 2048, 256, 1024, 8
    x, w, a, b, ct = (
        mx.random.normal(s, key=mx.random.key(i))
        for i, s in enumerate([(T, d_in), (d_out, d_in), (d_in, r), (r, d_out), (T, d_out)])
    )
    mx.eval(x, w, a, b, ct)

    def plain(x, a, b):
        return x @ w.T + 20.0 * ((x @ a) @ b)

    def fused(x, a, b):
        return lora_kernel.fused(20.0)(x, w, a, b)[0]

    peaks = {}
    for name, f in (("plain", plain), ("fused", fused)):
        step = mx.value_and_grad(lambda x, a, b, f=f: (f(x, a, b) * ct).sum(), argnums=(0, 1, 2))
        mx.eval(step(x, a, b))
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(step(x, a, b))
        peaks[name] = (mx.get_peak_memory() - before) / (4 * T * d_out)
    assert peaks["fused"] <= peaks["plain"] - 1.0, peaks


def test_install_routes_every_lora_linear(tiny_model_path, monkeypatch):
    from mlx_dpo.model import load

    loaded = load(str(tiny_model_path))
    want = lora_kernel.call if cpu_kernels.enabled() else lora_kernel.ORIGINAL_CALL
    assert LoRALinear.__call__ is want
    monkeypatch.setenv(cpu_kernels.OPT_OUT_ENV, "1")
    try:
        cpu_kernels.install(loaded.model)
        assert LoRALinear.__call__ is lora_kernel.ORIGINAL_CALL
    finally:
        monkeypatch.delenv(cpu_kernels.OPT_OUT_ENV)
        cpu_kernels.install(loaded.model)


def test_lora_bench_runs_both_candidates():
    fns = lora_kernel.bench(40, 16, 24, 4)
    assert list(fns) == list(kc.CANDIDATES["lora"])
    for fn in fns.values():
        fn()  # raises if a candidate cannot run on these shapes


def test_lora_takes_the_fused_adapter_on_a_smaller_margin(tmp_path):
    """3% faster: enough for the fused adapter (2%), not for a kernel on the 5% margin."""

    def fake_measure(fns):
        return {name: [1.0 if name == "mlx" else 0.97] for name in fns}

    chooser = kc.Chooser(tmp_path / "k.json", report=lambda _: None, measure_fn=fake_measure)
    assert chooser.choose("lora", "lora N64", lambda: {"mlx": None, "fused": None}) == "fused"
    assert chooser.choose("swiglu", "swiglu N64", lambda: {"mlx": None, "fused": None}) == "mlx"


@pytest.mark.parametrize("winner", ["fused", "mlx", "mixed"])
def test_step_choice_is_what_every_adapted_projection_will_run(winner):
    """The plan's `lora`: "fused" where every projection's shape class measured the fused
    adapter faster, "mlx" where none did and where the step cannot fuse, else the widths that
    keep mlx-lm's call ("mixed" here: the first shape timed, 64 -> 16, takes the fused one)."""
    timed = []

    def fake_measure(fns):
        timed.append(tuple(fns))
        fastest = "fused" if winner == "mixed" and len(timed) == 1 else winner
        return {name: [1.0 if name == fastest else 2.0] for name in fns}

    dims = [(64, 64), (64, 16), (64, 16), (64, 64)]  # q, k, v, o: two shape classes
    want = ((64, 64),) if winner == "mixed" else winner
    kc.reset(kc.Chooser(None, report=lambda _: None, measure_fn=fake_measure))
    lora_kernel.use(True)
    try:
        assert lora_kernel.step_choice(dims, 8, 300, dropout=0.0, float32=True) == want
        assert len(timed) == 2 and len(kc.chooser().decisions) == 2  # decided for the step
        with kc.pinned({"lora": "fused"}):
            assert lora_kernel.step_choice(dims, 8, 300, dropout=0.1, float32=True) == "mlx"
            assert lora_kernel.step_choice(dims, 8, 300, dropout=0.0, float32=False) == "mlx"
            lora_kernel.use(False)
            assert lora_kernel.step_choice(dims, 8, 300, dropout=0.0, float32=True) == "mlx"
    finally:
        lora_kernel.use(cpu_kernels.enabled())
        kc.reset()


def test_timings_adapt_projections_through_the_call_the_step_takes():
    """The kernels' timings (the SwiGLU's MLP block) adapt a projection as the step will: the
    fused function where `call` is routed and chose it for the shape, else mlx-lm's."""
    x, w = mx.ones((5, 8)), mx.ones((6, 8))
    a, half = mx.ones((8, 2)), mx.ones((5, 8), dtype=mx.float16)
    try:
        for routed, pinned, dtype_x, want_fused in [
            (True, "fused", x, True),
            (True, "mlx", x, False),
            (False, "fused", x, False),
            (True, "fused", half, False),
        ]:
            lora_kernel.use(routed)
            with kc.pinned({"lora": pinned}):
                got = lora_kernel.adapter(dtype_x, w, a)
            assert (got is not lora_kernel.mlx_lm_adapter) == want_fused, (routed, pinned)
    finally:
        lora_kernel.use(cpu_kernels.enabled())
