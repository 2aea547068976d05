"""mlx_dpo.cpu_kernels: the fused-arithmetic exp, SwiGLU and causal attention used on the x86
CPU build, against float64 (numpy, torch) and against the mx ops they replace."""

from __future__ import annotations

import gc
import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dpo import cpu_kernels, kernel_choice


def test_exp_matches_float64_over_the_float32_range():
    x = np.concatenate([np.linspace(-87.0, 88.0, 200_001), [0.0, -1e-8, 1e-8, 0.5, -0.5]])
    got = np.array(cpu_kernels.exp(mx.array(x.astype(np.float32))))
    want = np.exp(x.astype(np.float32).astype(np.float64))
    exact = np.array(mx.exp(mx.array(x.astype(np.float32))))
    err, err_mx = (np.abs(a - want) / want for a in (got, exact))
    # Near |x| = 88 both lose ~4e-6 to rounding x * log2(e) in float32; where softmax
    # arguments live (|x| < 10) the polynomial is within 1e-6.
    assert err.max() < err_mx.max() + 5e-7
    assert err[np.abs(x) < 10].max() < 1e-6
    # a masked score (-inf) and anything that underflows give exactly 0, as mx.exp: not a
    # tiny float that a softmax's division makes subnormal (slow in x86 GEMMs)
    tiny = np.array(cpu_kernels.exp(mx.array([-np.inf, -200.0, -88.5], dtype=mx.float32)))
    assert np.all(tiny == 0.0)


def test_exp_fuses_into_three_loops():
    """The exp's compiled loops each write one array: t, 2^n's bits, the result (the result
    takes t's buffer). Were its rounded n shared by both halves, or its polynomial deeper than
    mx.compile fuses, more loops would each write a temporary: 5 arrays before the fix."""
    x = mx.random.normal((1 << 20,), key=mx.random.key(0))
    shifted = mx.compile(lambda x: cpu_kernels._exp(x - 1.0))  # x's own op fused in too
    previous = mx.set_cache_limit(0)  # freed buffers go back at once: peaks are live bytes
    try:
        for fn in (cpu_kernels.exp, shifted):
            mx.eval(x, fn(x))
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            y = fn(x)
            mx.eval(y)
            assert (mx.get_peak_memory() - base) / x.nbytes <= 2.5
            np.testing.assert_allclose(
                np.array(y), np.exp(np.array(x) - (fn is shifted)), rtol=1e-6
            )
            del y
    finally:
        mx.set_cache_limit(previous)


def test_logsumexp_matches_float64():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 3000)) * 30).astype(np.float32)
    got = np.array(cpu_kernels.logsumexp(mx.array(x)))
    x64 = x.astype(np.float64)
    m = x64.max(-1, keepdims=True)
    want = (np.log(np.exp(x64 - m).sum(-1, keepdims=True)) + m)[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_swiglu_values_and_gradients_match_silu():
    rng = np.random.default_rng(1)
    gate, x = (mx.array(rng.standard_normal((3, 50)).astype(np.float32) * 6) for _ in range(2))
    cot = mx.array(rng.standard_normal((3, 50)).astype(np.float32))

    def loss(fn):
        return lambda g, x: (fn(g, x) * cot).sum()

    def exact(g, x):
        return nn.silu(g) * x

    np.testing.assert_allclose(cpu_kernels.swiglu(gate, x), exact(gate, x), rtol=2e-6, atol=1e-6)
    for got, want in zip(
        mx.grad(loss(cpu_kernels.swiglu), argnums=(0, 1))(gate, x),
        mx.grad(loss(exact), argnums=(0, 1))(gate, x),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def _attention_torch(q, k, v, scale, d_out):
    """float64 causal attention with grouped heads, and its gradients."""
    torch = pytest.importorskip("torch")
    q, k, v = (
        torch.tensor(np.array(a), dtype=torch.float64, requires_grad=True) for a in (q, k, v)
    )
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    T = q.shape[2]
    scores = (q * scale) @ kr.transpose(-1, -2)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = torch.softmax(scores, -1) @ vr
    (out * torch.tensor(np.array(d_out), dtype=torch.float64)).sum().backward()
    return [t.detach().numpy() for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.torch
@pytest.mark.parametrize("block", sorted(set(cpu_kernels.FLASH_BLOCKS.values())))
@pytest.mark.parametrize("T", [1, 37, 64, 150])
def test_causal_attention_values_and_gradients_match_torch(T, block):
    rng = np.random.default_rng(T)
    B, H, Hkv, D = 2, 4, 2, 16
    q = mx.array(rng.standard_normal((B, H, T, D)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((B, Hkv, T, D)).astype(np.float32)) for _ in range(2))
    d_out = mx.array(rng.standard_normal((B, H, T, D)).astype(np.float32))
    scale = D**-0.5

    def f(q, k, v):
        out = cpu_kernels.scaled_dot_product_attention(q, k, v, None, scale, "causal", None, block)
        return (out * d_out).sum(), out

    (_, out), grads = mx.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
    want = _attention_torch(q, k, v, scale, d_out)
    for got, ref in zip([out, *grads], want, strict=True):
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.array(got), ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("block", sorted(set(cpu_kernels.FLASH_BLOCKS.values())))
def test_attention_is_causal_whatever_the_length(block):
    # A row's output must not see later positions: the first T rows of a longer sequence give
    # the same result (to BLAS round-off: OpenBLAS's sums depend slightly on matrix shapes).
    rng = np.random.default_rng(3)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 200, 8)).astype(np.float32)) for _ in range(3))
    full = cpu_kernels.scaled_dot_product_attention(q, k, v, None, 0.3, "causal", None, block)
    for T in (1, 17, 70, 128, 129):
        short = cpu_kernels.scaled_dot_product_attention(
            q[:, :, :T], k[:, :, :T], v[:, :, :T], None, 0.3, "causal", None, block
        )
        np.testing.assert_allclose(short, full[:, :, :T], rtol=0, atol=1e-6)


def test_attention_leaves_other_masks_and_caches_to_mlx_lm():
    from mlx_lm.models.base import scaled_dot_product_attention as original

    rng = np.random.default_rng(4)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 5, 8)).astype(np.float32)) for _ in range(3))
    mask = mx.array(rng.random((5, 5)) > 0.3) | mx.eye(5, dtype=mx.bool_)
    got = cpu_kernels.scaled_dot_product_attention(q, k, v, None, 0.5, mask)
    assert mx.array_equal(got, original(q, k, v, None, 0.5, mask)).item()


def test_install_swaps_the_model_family_functions_and_opt_out(tiny_model_path, monkeypatch):
    import sys

    from mlx_lm.models import base

    from mlx_dpo.model import load

    loaded = load(str(tiny_model_path))
    module = sys.modules[type(loaded.model).__module__]
    if not cpu_kernels.enabled():
        pytest.skip("fast CPU kernels are for the x86 CPU build")
    # the dispatchers, which run the measured choice (conftest: MLX_DPO_KERNELS=all=on)
    assert module.scaled_dot_product_attention is cpu_kernels.auto_attention
    assert module.swiglu is cpu_kernels.auto_swiglu
    assert cpu_kernels.installed(loaded.model)
    tokens = mx.array([[5, 9, 17, 3, 44, 8, 100, 7]])
    fast = loaded.model(tokens)
    with monkeypatch.context() as m:
        m.setattr(module, "scaled_dot_product_attention", base.scaled_dot_product_attention)
        m.setattr(module, "swiglu", lambda g, x: nn.silu(g) * x)
        exact = loaded.model(tokens)
    np.testing.assert_allclose(fast, exact, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(cpu_kernels.OPT_OUT_ENV, "1")
    assert not cpu_kernels.enabled()


@pytest.mark.parametrize("opt_out", ["0", "1"])
def test_doctor_says_whether_the_kernels_run(opt_out, monkeypatch):
    """On this machine's platform (each platform's line: tests/test_platform.py)."""
    from click.testing import CliRunner

    from mlx_dpo.cli import main
    from mlx_dpo.platform import cpu_model, detect

    monkeypatch.setenv(cpu_kernels.OPT_OUT_ENV, opt_out)
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("cpu exp kernels:"))
    runs = detect().kind == "x86-cpu" and opt_out == "0"
    # the verdict leads the line ("off: ..." / "off (...)"); the cache path at its end is a
    # random temporary name that may itself contain "off"
    verdict = line.removeprefix("cpu exp kernels:").strip()
    assert verdict.startswith("off") == (not runs), line
    assert cpu_kernels.enabled() == runs == ("fused-arithmetic" in line)
    assert f"cpu: {cpu_model()}" in result.output.splitlines()  # the timing cache's CPU


def test_attention_backward_memory_is_linear_in_length():
    # FlashAttention's point: no T x T probabilities kept. Quadrupling T may quadruple the
    # backward's peak, and the growth beyond that must stay far below the H x T x T
    # probabilities: with every block's probabilities alive (dk and dv out of the chain) it
    # was 27.5 MiB at T = 2,048, against 1.6 MiB here. The bound is not on the ratio: a busy
    # CI once measured 5.26x; alone or beside busy processes it gives 4.08-4.22x, and what
    # moved it there was not found (a ratio bound was 1 x peak(512) = 8 MiB of slack).
    B, H, Hkv, D = 1, 4, 2, 32

    def peak(T):
        q, d_out = (mx.random.normal((B, H, T, D)) for _ in range(2))
        k, v = (mx.random.normal((B, Hkv, T, D)) for _ in range(2))
        mx.eval(q, k, v, d_out)

        def f(q, k, v):
            return (
                cpu_kernels.scaled_dot_product_attention(q, k, v, None, 0.2, "causal") * d_out
            ).sum()

        grads = mx.grad(f, argnums=(0, 1, 2))
        mx.eval(grads(q, k, v))
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(grads(q, k, v))
        return mx.get_peak_memory() - base

    previous = mx.set_cache_limit(0)  # freed buffers go back at once: peaks are live bytes
    try:
        beyond_linear = peak(2048) - 4 * peak(512)
    finally:
        mx.set_cache_limit(previous)
    probabilities = H * 2048 * 2048 * 4
    assert beyond_linear < probabilities / 4, beyond_linear / 2**20


@pytest.mark.parametrize("winner", ["mlx", "fast", "flash-16"])
def test_dispatchers_run_what_was_measured_faster(winner, tmp_path):
    """With injected timings the dispatchers give exactly the chosen function's numbers
    ("flash-16": the attention's 16-query blocks win, the other kernels keep MLX's)."""
    from mlx_lm.models import base
    from mlx_lm.models.activations import swiglu as mlx_swiglu

    from mlx_dpo import kernel_choice as kc

    seen = []

    def fake_measure(fns):
        seen.append(sorted(fns))
        if winner == "flash-16":  # each smaller block 10% faster: the smallest wins
            return {name: [{"flash": 0.9, "flash-32": 0.8, "flash-16": 0.7}.get(name, 1.0)]
                    for name in fns}  # fmt: skip
        return {name: [1.0 if (name == "mlx") == (winner == "mlx") else 2.0] for name in fns}

    kc.reset(kc.Chooser(tmp_path / "k.json", report=lambda _: None, measure_fn=fake_measure))
    try:
        q, k, v = (mx.random.normal((2, 4, 70, 16)) for _ in range(3))
        got = cpu_kernels.auto_attention(q, k, v, None, 0.25, "causal")
        gate, x = mx.random.normal((2, 70, 24)), mx.random.normal((2, 70, 24))
        got_swiglu = cpu_kernels.auto_swiglu(gate, x)
        opts = cpu_kernels.head_options(40, 16, 300)
    finally:
        kc.reset()
    if winner == "mlx":
        want = base.scaled_dot_product_attention(q, k, v, None, 0.25, "causal")
        want_swiglu, want_opts = mlx_swiglu(gate, x), {"fast_exp": False}
    elif winner == "flash-16":
        want = cpu_kernels.scaled_dot_product_attention(q, k, v, None, 0.25, "causal", None, 16)
        want_swiglu, want_opts = mlx_swiglu(gate, x), {"fast_exp": False}
    else:
        want = cpu_kernels.scaled_dot_product_attention(q, k, v, None, 0.25, "causal")
        want_swiglu, want_opts = cpu_kernels.swiglu(gate, x), {"fast_exp": True, "exp_tile": 2048}
    assert mx.array_equal(got, want) and mx.array_equal(got_swiglu, want_swiglu)
    assert opts == want_opts
    attention = ["flash", "flash-16", "flash-32", "mlx"]
    assert seen == [attention, ["fused", "mlx"], ["exp", "exp-kept", "exp-wide", "mlx"]]


def test_kernel_benches_run_every_candidate_on_the_real_shapes():
    """The timing closures compute forward and backward on arrays of the given shapes."""
    benches = [
        cpu_kernels._attention_bench((1, 4, 2, 70, 16), 0.25, mx.float32),
        cpu_kernels._swiglu_bench((1, 70, 24), mx.float32),
        cpu_kernels._head_bench(40, 16, 300),
        cpu_kernels._mlp_bench(70, 16, 24, mx.float32),
        cpu_kernels._mlp_bench(70, 16, 24, mx.float32, {"gate_proj": 4, "down_proj": 2}),
    ]
    for fns in benches:
        for fn in fns.values():
            fn()  # raises if a candidate cannot run on these shapes
    assert list(benches[0]) == list(kernel_choice.CANDIDATES["attention"])
    assert sorted(benches[2]) == ["exp", "exp-kept", "exp-wide", "mlx"]


def test_head_keeps_its_logits_only_where_the_class_fits_the_cap():
    """At Qwen's 151,936 vocabulary 1 GiB of fp32 logits is 1,766 tokens: 1,024 scored tokens
    (4 x 1,024 x 151,936 = 0.62 GB) may keep them; 1,100 are in the class up to 2,048 (1.24 GB),
    which may not; a small vocabulary keeps them at 16,384 tokens (4 x 16,384 x 8,192 = 0.5 GB)."""
    every = ["mlx", "exp", "exp-wide", "exp-kept"]
    assert cpu_kernels.head_candidates(1024, 151936) == every
    assert cpu_kernels.head_candidates(1100, 151936) == every[:3]
    assert cpu_kernels.head_candidates(16384, 8192) == every


def test_head_timing_slice_holds_no_pending_random_draws(tmp_path):
    """The compiled timer captures the head and targets as constants: they must be evaluated
    arrays, or every timed call would draw them again (the draws then outweighed the head)."""
    _, head, targets = cpu_kernels._head_arrays(40, 16, 300)
    for a in [*head.arrays.values(), targets]:
        dot = tmp_path / "graph.dot"
        mx.export_to_dot(str(dot), a)
        assert "shape=rectangle" not in dot.read_text()  # no operation left to run
    lazy = tmp_path / "lazy.dot"
    mx.export_to_dot(str(lazy), mx.random.normal((3,), key=mx.random.key(0)))
    assert "shape=rectangle" in lazy.read_text()  # the check does see a pending draw


def test_swiglu_is_timed_inside_the_mlp_of_the_installed_model(tmp_path):
    """Once a model is installed its MLP is known: the SwiGLU's shape class holds the hidden
    size and the LoRA rank its last block's MLP has (the adapters go in after `install`), and
    the candidates are timed inside that block (each a new measurement)."""
    from mlx_lm.models import qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlx_dpo import kernel_choice as kc

    if not cpu_kernels.enabled():
        pytest.skip("the CPU kernels run on the x86 CPU build only")
    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=48, num_hidden_layers=2, intermediate_size=136,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=64,
    )  # fmt: skip
    benches = []

    def fake_measure(fns):
        benches.append(fns)
        return {name: [1.0] for name in fns}

    kc.reset(kc.Chooser(None, report=lambda _: None, measure_fn=fake_measure))
    model = qwen2.Model(args)
    try:
        assert cpu_kernels.swiglu_choice(100, 136) == "mlx"
        cpu_kernels.install(model)
        assert cpu_kernels.swiglu_choice(100, 136) == "mlx"
        model.freeze()
        lora = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["mlp.gate_proj", "mlp.up_proj"]}
        linear_to_lora_layers(model, 1, lora)
        assert cpu_kernels._mlp_of(136) == (48, {"gate_proj": 4, "up_proj": 4})
        reference = qwen2.Model(args)  # a --ref-model of the same shape, installed after it
        cpu_kernels.install(reference)
        assert cpu_kernels._mlp_of(136) == (48, {"gate_proj": 4, "up_proj": 4})
        del reference
        gc.collect()  # freed after the reference pass: the policy's adapters still count
        assert cpu_kernels._mlp_of(136) == (48, {"gate_proj": 4, "up_proj": 4})
        assert cpu_kernels.swiglu_choice(100, 136) == "mlx"
        shapes = list(kc.chooser().decisions)
    finally:
        kc.reset()
    # the block with adapters decides their call first: it adapts them as the step will
    adapters_class = "lora I48 N128 O136 R4"  # gate and up: 48 -> 136 at rank 4, one class
    assert shapes == [
        "swiglu I136 N128",
        "swiglu H48 I136 N128 R0",
        adapters_class,
        "swiglu H48 I136 N128 R4",
    ]
    assert len(benches) == 4 and all(sorted(b) == ["fused", "mlx"] for b in benches)


def test_mlp_block_adapts_its_projections_as_lora_linear_does():
    """The block the SwiGLU is timed in computes what mlx-lm's MLP with LoRALinear layers
    computes on the same weights: only the projections given adapters get them."""
    from mlx_lm.tuner.lora import LoRALinear

    x, w, adapters = cpu_kernels._mlp_arrays(8, 16, 24, mx.float32, {"up_proj": 4})
    assert list(adapters) == ["up_proj"] and adapters["up_proj"][0].shape == (16, 4)
    up = LoRALinear(16, 24, r=4, scale=20.0)
    up.linear.weight, (up.lora_a, up.lora_b) = w["up_proj"], adapters["up_proj"]
    want = (nn.silu(x @ w["gate_proj"].T) * up(x)) @ w["down_proj"].T
    for act, call in itertools.product(
        (cpu_kernels._mlx_swiglu, cpu_kernels.swiglu), ("fused", "mlx")
    ):
        with kernel_choice.pinned({"lora": call}):
            got = cpu_kernels._mlp_block(w, adapters, act)(x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bare = cpu_kernels._mlp_block(w, {}, cpu_kernels._mlx_swiglu)(x)
    assert not np.allclose(bare, want, rtol=1e-3)  # the adapter changes the output


def test_bad_kernel_override_fails_at_load_and_doctor_reports_it(tiny_model_path, monkeypatch):
    from click.testing import CliRunner

    from mlx_dpo import kernel_choice
    from mlx_dpo.cli import main
    from mlx_dpo.config import ConfigError
    from mlx_dpo.model import load

    if not cpu_kernels.enabled():
        pytest.skip("the kernels are for the x86 CPU build")
    monkeypatch.setenv(kernel_choice.ENV, "attn=off")
    kernel_choice.reset()
    try:
        with pytest.raises(ConfigError, match="attn=off"):
            load(str(tiny_model_path))
        result = CliRunner().invoke(main, ["doctor"])
        assert result.exit_code == 0, result.output
        assert "ERROR" in result.output and "attn=off" in result.output
    finally:
        monkeypatch.delenv(kernel_choice.ENV)
        kernel_choice.reset()
