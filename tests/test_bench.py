"""The benchmark runs end to end on a tiny model and writes the JSON it promises. Speed is never
asserted: the numbers come from a shared machine."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_bench_tiny_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--tiny", "--variants", "mlx_dpo", "--json", str(out)]
    if HAS_TORCH:  # the torch side and the numbers check, in their own process
        cmd += ["--compare-torch", "--torch-variants", "own:completion"]
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
        agree = report["summary"]["agreement"]["torch-own:completion"]
        assert agree["policy_logps_rel"] < 1e-4 and agree["grad_norms_rel"] < 1e-3, agree
        assert "ratio_step_vs_best_torch" in report["summary"]
