"""The benchmark runs end to end on a tiny model and writes the JSON it promises. Speed is never
asserted: the numbers come from a shared machine."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from mlx_dpo import cpu_kernels

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_bench_tiny_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--tiny", "--variants", "mlx_dpo", "--json", str(out)]
    if HAS_TORCH:  # the torch side and the numbers check, in their own process
        cmd += ["--compare-torch", "--torch-variants", "own:completion", "--torch-device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step min" in proc.stdout and "MFU" in proc.stdout
    report = json.loads(out.read_text())
    assert {"meta", "args", "model", "mlx", "summary"} <= set(report)
    res = report["mlx"]["results"]["mlx_dpo"]
    for phase in ("reference", "reference_big", "fwd_bwd", "optimizer", "step"):
        assert {"min_ms", "median_ms", "peak_mb", "peak_above_mb"} <= set(res[phase]), phase
    assert res["flops"]["step"] > res["flops"]["reference_forward"] > 0
    row = report["summary"]["rows"][0]
    for key in ("step_min_ms", "pairs_per_s", "tokens_per_s", "gflops", "mfu", "peak_mb"):
        assert row[key] > 0, key
    assert report["mlx"]["memory_plan"]["default"]["total_mb"] > 0
    assert report["mlx"]["max_rss_mb"] > 0
    if HAS_TORCH:
        agreement = report["summary"]["agreement"]
        # the package's step, and where it runs the fast CPU kernels the opted-out one too
        names = ["torch-own:completion"]
        names += ["torch-own:completion (mx.exp)"] if cpu_kernels.enabled() else []
        for name in names:
            agree = agreement[name]
            assert agree["policy_logps_rel"] < 1e-4 and agree["grad_norms_rel"] < 1e-3, agree
        assert "ratio_step_vs_best_torch" in report["summary"]
        assert report["torch"]["device"] == "cpu"
        assert report["summary"]["gemm_peak_gflops"].keys() == {"mlx_blas", "torch"}


def test_mx_exp_variant_opts_out_and_restores(tiny_model_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    monkeypatch.delenv(cpu_kernels.OPT_OUT_ENV, raising=False)
    import mlx_worker

    net, _ = mlx_worker.load_model(str(tiny_model_path))
    module = sys.modules[type(net).__module__]

    def state():
        env = os.environ.get(cpu_kernels.OPT_OUT_ENV)
        return module.scaled_dot_product_attention, module.swiglu, env

    before = state()
    with mlx_worker.variant_context(mlx_worker.VARIANTS["mx.exp"], net):
        assert not cpu_kernels.enabled()
        assert module.swiglu is not cpu_kernels.swiglu
        assert module.scaled_dot_product_attention is not cpu_kernels.scaled_dot_product_attention
    assert state() == before
