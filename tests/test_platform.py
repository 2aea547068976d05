"""Every platform branch on this machine: the platform is a value (mlx_dpo.platform.Platform),
so the x86 CPU, arm CPU, Metal and CUDA choices of the kernels, the doctor, the compute path,
the quantized layers, the memory budget, the wired limit and the reference cache key all run
here. What only real hardware can show (speed, Metal's kernels) is for CI on macos-14 and
scripts/gpu-check.sh."""

import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_dpo import cpu_kernels, doctor, memory, reference
from mlx_dpo import model as model_lib
from mlx_dpo.config import TrainConfig
from mlx_dpo.platform import KINDS, Platform, cpu_model, detect, set_wired_limit
from mlx_dpo.reference import model_identity

GIB = 1 << 30


@pytest.fixture(autouse=True)
def _no_opt_out(monkeypatch):
    monkeypatch.delenv(cpu_kernels.OPT_OUT_ENV, raising=False)


def test_detect_describes_this_machine():
    plat = detect()
    assert plat.kind in KINDS
    assert plat.gpu == (mx.default_device() != mx.cpu)
    assert plat.memory_bytes > 0


def test_make_refuses_unknown_kinds():
    with pytest.raises(ValueError, match="x86-cpu"):
        Platform.make("tpu")


@pytest.mark.parametrize("kind", KINDS)
def test_kernels_and_the_doctor_line(kind, monkeypatch):
    """Only the x86 CPU build gets the fused-arithmetic kernels; the doctor says so on every
    platform, and says 'off' when opted out."""
    plat = Platform.make(kind)
    assert cpu_kernels.enabled(plat) == (kind == "x86-cpu")
    line = cpu_kernels.describe(plat)
    assert line.startswith("fused-arithmetic") == (kind == "x86-cpu"), line
    assert ("not the x86 CPU build" in line) == (kind != "x86-cpu"), line
    monkeypatch.setenv(cpu_kernels.OPT_OUT_ENV, "1")
    assert not cpu_kernels.enabled(plat)
    assert cpu_kernels.describe(plat).startswith("off")


@pytest.mark.parametrize(
    "kind, budget, source",
    [
        ("x86-cpu", 32 * GIB, "total RAM"),
        ("arm-cpu", 32 * GIB, "total RAM"),
        ("metal", 24 * GIB, "Metal's recommended working set"),  # 0.75 x 32 GiB
        ("cuda", 32 * GIB, "the CUDA device's memory"),
    ],
)
def test_memory_budget_and_backend_lines(kind, budget, source):
    plat = Platform.make(kind, memory_bytes=32 * GIB)
    assert memory.available_bytes(plat) == (budget, source)
    lines = doctor.backend_lines(plat)
    assert {"x86-cpu": "CPU (x86)", "arm-cpu": "CPU (arm)", "metal": "Metal", "cuda": "CUDA"}[
        kind
    ] in lines[0]
    assert f"memory budget for training: {budget / GIB:.1f} GiB ({source})" in lines
    # the planner refuses a step by that budget, whatever the machine running the test has
    plan = memory.MemoryPlan({"weights": budget}, {}, rows=2, tokens_per_row=64)
    with pytest.raises(memory.ConfigError, match=source.replace("'", ".")):
        memory.check_fits(plan, plat=plat)
    memory.check_fits(memory.MemoryPlan({"weights": GIB}, {}, 2, 64), plat=plat)


def test_metal_without_the_key_falls_back_to_unified_memory():
    plat = Platform("Darwin", "arm64", "metal", 16 * GIB, {"memory_size": 16 * GIB})
    assert memory.available_bytes(plat) == (16 * GIB, "unified memory")
    assert set_wired_limit(plat, setter=pytest.fail) is None  # nothing to set it from


@pytest.mark.parametrize("kind", KINDS)
def test_wired_limit_only_on_metal(kind):
    calls = []
    plat = Platform.make(kind, memory_bytes=32 * GIB)
    note = set_wired_limit(plat, setter=calls.append)
    if kind == "metal":  # mlx-lm's choice: the recommended working set
        assert calls == [24 * GIB] and "24.0 GiB" in note
    else:
        assert calls == [] and note is None


def _module_functions(model):
    module = sys.modules[type(model).__module__]
    return module.scaled_dot_product_attention, module.swiglu


@pytest.mark.parametrize("kind", KINDS)
def test_compute_path_and_quantized_layers(kind, tiny_model_path, monkeypatch):
    """CPUs: float32 compute, quantized layers dequantized at use, the x86 kernels on x86 only.
    Metal/CUDA: the model's own dtype and QuantizedLinear (mx.quantized_matmul), mlx-lm's
    attention even after an x86 model swapped the kernels in, and the wired limit on Metal."""
    wired = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: wired.append(n) or 0)
    model_lib.load(str(tiny_model_path), platform=Platform.make("x86-cpu"))  # kernels swapped in
    plat = Platform.make(kind)
    loaded = model_lib.load(str(tiny_model_path), quantize=4, platform=plat)
    layers = [type(m) for _, m in loaded.model.named_modules()]
    attention, swiglu = _module_functions(loaded.model)
    if plat.gpu:
        assert model_lib.DequantLinear not in layers and nn.QuantizedLinear in layers
        assert attention is not cpu_kernels.scaled_dot_product_attention
        assert swiglu is not cpu_kernels.swiglu
        assert not cpu_kernels.installed(loaded.model)
    else:
        assert model_lib.DequantLinear in layers and nn.QuantizedLinear not in layers
        assert cpu_kernels.installed(loaded.model) == (kind == "x86-cpu")
        assert (swiglu is cpu_kernels.auto_swiglu) == (kind == "x86-cpu")  # the dispatcher
    assert wired == ([int(0.75 * 16 * GIB)] if kind == "metal" else [])


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_weights_stay_bf16_only_on_a_gpu(kind, tiny_model_path):
    loaded = model_lib.load(str(tiny_model_path), compute_dtype="native")
    loaded.model.set_dtype(mx.bfloat16)
    model_lib.set_compute_path(loaded.model, "auto", Platform.make(kind))
    dtypes = {v.dtype for _, v in tree_flatten(loaded.model.parameters())}
    assert dtypes == ({mx.bfloat16} if kind in ("metal", "cuda") else {mx.float32})


def test_reference_cache_key_differs_per_platform(tiny_model_path):
    """The reference log-probs of one model differ by round-off across kernels: one cache entry
    per platform (Metal and CUDA are both 'gpu' devices to MLX)."""
    cfg = TrainConfig(model=str(tiny_model_path))
    loaded = model_lib.load(str(tiny_model_path), compute_dtype="native")
    keys = {
        k: reference.cache_key(model_identity(cfg, loaded, Platform.make(k)), []) for k in KINDS
    }
    assert len(set(keys.values())) == len(KINDS)
    again = reference.cache_key(model_identity(cfg, loaded, Platform.make("metal")), [])
    assert again == keys["metal"]
    ld = TrainConfig(model=str(tiny_model_path), ld_alpha=0.5)
    assert reference.cache_key(model_identity(ld, loaded, Platform.make("metal")), []) != again


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse sse2 avx fma avx2 bmi2
processor\t: 1
model name\t: another core, not read
"""
ZEN5 = ZEN3.replace("cpu family\t: 25", "cpu family\t: 26").replace("avx2", "avx2 avx512f")
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd crc32 atomics sve i8mm bf16
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_cpu_model_tells_apart_cpus_that_share_a_name():
    """Cloud VMs call a Zen 3 and a Zen 5 both "AMD EPYC": family and vector instructions
    must make them two machines to the kernels' timing cache."""
    zen3, zen5 = cpu_model(ZEN3, "Linux"), cpu_model(ZEN5, "Linux")
    assert (
        zen3
        == "AMD EPYC (vendor_id AuthenticAMD, cpu family 25, model 1, stepping 1; avx avx2 fma)"
    )
    assert zen5 != zen3 and "cpu family 26" in zen5 and zen5.endswith("avx avx2 fma avx512f)")
    arm = cpu_model(GRAVITON, "Linux")
    assert "CPU implementer 0x41, CPU part 0xd40" in arm and arm.endswith("asimd sve i8mm bf16)")
    assert "no vector extensions listed" in cpu_model("model name\t: X\n", "Linux")


def test_kernel_cache_is_per_cpu(monkeypatch, tmp_path):
    from mlx_dpo import kernel_choice
    from mlx_dpo import platform as platform_mod

    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path))
    paths = []
    for text in (ZEN3, ZEN5, ZEN3):
        monkeypatch.setattr(platform_mod, "cpu_model", lambda t=text: cpu_model(t, "Linux"))
        paths.append(kernel_choice.default_cache_path())
    assert paths[0] == paths[2] != paths[1]
