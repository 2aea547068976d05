"""The benchmark runs end to end on a tiny model and writes the JSON it promises. Speed is never
asserted: the numbers come from a shared machine."""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


def _grid():
    sys.path.insert(0, str(BENCH.parent))
    import grid

    return grid


def test_grid_table_from_injected_cells():
    """The grid's Markdown: times, the default against its own best variant, the speed-ups
    over TRL and mlx-lm-lora, and the plan against the measured RSS (no timing here)."""
    grid = _grid()
    ok = lambda s, **kw: {"status": "ok", "step_s": s, **kw}  # noqa: E731
    point = {
        "model": "5m", "length": 128, "pairs": 2, "dtype": "fp32",
        "cells": {
            "mlx_dpo": ok(0.5, peak_rss_bytes=400 << 20, plan_bytes=380 << 20),
            "attention-off": ok(0.4), "swiglu-off": ok(0.6), "head-off": {"status": "failed"},
            "kernels-off": ok(1.0, grad_checkpoint=True), "trl": ok(1.5),
            "trl-precompute": ok(1.0), "mlx-lm-lora": {"status": "n/a"},
        },
    }  # fmt: skip
    table = grid.markdown([point], grid.VARIANTS)
    header, _, row = table.splitlines()
    split = lambda line: [c.strip() for c in line.strip("| ").split("|")]  # noqa: E731
    cells = dict(zip(split(header), split(row), strict=True))
    assert cells["mlx_dpo"] == "0.50" and cells["head-off"] == "failed"
    assert cells["kernels-off"] == "1.00 (grad checkpoint)"  # the plan did not fit without
    assert cells["default vs best own"] == "+25%"  # 0.5 against attention-off's 0.4
    assert cells["TRL / default"] == "3.00x" and cells["TRL-pre / default"] == "2.00x"
    assert cells["mlx-lm-lora / default"] == "-"
    assert cells["RSS MiB"] == "400" and cells["plan / RSS"] == "0.95"
    # a gap past 5% but within the updates' spread says so; one past the spread does not
    near = {**point, "cells": {"mlx_dpo": ok(0.53, spread=0.04), "lora-off": ok(0.5, spread=0.2)}}
    far = {**point, "cells": {"mlx_dpo": ok(0.53, spread=0.02), "lora-off": ok(0.5, spread=0.03)}}
    rows = grid.markdown([near, far], ["mlx_dpo", "lora-off"]).splitlines()
    gaps = [
        dict(zip(split(rows[0]), split(r), strict=True))["default vs best own"] for r in rows[2:]
    ]
    assert gaps == ["+6% (updates vary 20%)", "+6%"]
    run = {"cpu": "AMD EPYC (cpu family 25; avx2)", "threads": 1, "load_average_before": [1.0]}
    line = grid.header(run)  # the machine above the table; "?" for what was not recorded
    assert line.startswith("CPU: AMD EPYC (cpu family 25; avx2); BLAS threads: 1;")
    assert line.endswith("before [1.0], after ?")


def test_grid_cell_from_its_rounds():
    """A cell over two rounds: the fastest update after warm-up, the largest RSS, and the
    spread of the updates after warm-up only (the first update's kernel timing is not noise)."""
    grid = _grid()
    run = lambda times, rss: {  # noqa: E731
        "step_s_min": min(times[1:]), "step_times": times, "peak_rss_bytes": rss,
        "load_average": [1.0], "plan": {"total": 7, "parts": {}},
    }  # fmt: skip
    cell = {"runs": [run([9.0, 2.0, 2.5], 100), run([8.0, 2.4, 1.6], 120)]}
    grid.summarize(cell, warmup=1)
    assert cell["step_s"] == 1.6 and cell["peak_rss_bytes"] == 120 and cell["plan_bytes"] == 7
    assert cell["spread"] == pytest.approx(2.5 / 1.6 - 1)
    one = {"runs": [run([9.0, 2.0], 100)]}
    grid.summarize(one, warmup=1)
    assert "spread" not in one  # one update: no spread to speak of


def test_grid_resume_keeps_the_runs_finished_on_this_cpu(tmp_path, monkeypatch):
    """--resume runs only what an earlier command with the same --out did not finish on this
    CPU: a missing run and one from another CPU run again; without it every run does."""
    grid = _grid()
    ran = []

    def fake_run(cmd, env, timeout, out_json):
        ran.append(out_json.name)
        run = {"step_s_min": 1.0, "step_times": [2.0, 1.0], "peak_rss_bytes": 1, "load_average": []}
        out_json.write_text(json.dumps(run))

    monkeypatch.setattr(grid, "checkpoint", lambda *a: tmp_path / "m")
    monkeypatch.setattr(grid, "command", lambda *a: ["true"])
    monkeypatch.setattr(grid, "run_variant", fake_run)
    point, argv = ("5m", 128, 2, "fp32"), ["--variants", "mlx_dpo", "swiglu-off", "--warmup", "1"]
    grid.run_point(point, grid.parse_args(argv), tmp_path, tmp_path)
    assert len(ran) == 4  # 2 variants x 2 rounds
    other = tmp_path / "5m-128-2-fp32-swiglu-off-1.json"
    other.write_text(json.dumps({**json.loads(other.read_text()), "cpu": "another CPU"}))
    (tmp_path / "5m-128-2-fp32-mlx_dpo-0.json").unlink()
    ran.clear()
    report = grid.run_point(point, grid.parse_args([*argv, "--resume"]), tmp_path, tmp_path)
    assert sorted(ran) == ["5m-128-2-fp32-mlx_dpo-0.json", "5m-128-2-fp32-swiglu-off-1.json"]
    assert [bool(x.get("resumed")) for x in report["cells"]["mlx_dpo"]["runs"]] == [False, True]
    header = grid.header({"cpu": "c", "threads": 1, "points": [report]})
    assert "2 of 4 runs resumed" in header
    ran.clear()
    grid.run_point(point, grid.parse_args(argv), tmp_path, tmp_path)
    assert len(ran) == 4


def test_grid_commands(tmp_path):
    """TRL has no 4-bit CPU path and cannot read the demo's MLX weights: those are n/a; the
    mlx_dpo variants pass their kernel override."""
    grid = _grid()
    args = grid.parse_args(["--bench-python", sys.executable, "--warmup", "1", "--steps", "2"])
    m = tmp_path / "m"
    cmd = grid.command("attention-off", m, 128, 2, "fp32", args, tmp_path / "o.json")
    assert cmd[-2:] == ["--kernels", "attention=off"] and "--quantize" not in cmd
    assert "--quantize" in grid.command("mlx_dpo", m, 128, 2, "q4", args, tmp_path / "o.json")
    assert grid.command("trl", m, 128, 2, "q4", args, tmp_path / "o.json") is None
    assert "--precompute" in grid.command("trl-precompute", m, 128, 2, "fp32", args, m)
    demo = grid.checkpoint("demo", 2, tmp_path)
    assert grid.command("trl", demo, 128, 2, "fp32", args, m) is None
    assert "--quantize" not in grid.command("mlx-lm-lora", demo, 128, 2, "q4", args, m)
    args.bench_python = str(tmp_path / "missing")
    assert grid.command("mlx-lm-lora", m, 128, 2, "fp32", args, m) is None


def test_grid_cells_say_why_a_side_did_not_finish(tmp_path):
    """A process past --timeout, one SIGKILLed (the OOM killer's signal) and one that exits 1
    end as their own cells; the grid goes on. The child asked to be the OOM killer's first."""
    grid = _grid()
    out = tmp_path / "o.json"
    py, env = [sys.executable, "-c"], dict(os.environ)
    adj = f"open({str(out)!r}, 'w').write(open('/proc/self/oom_score_adj').read())"
    if Path("/proc/self/oom_score_adj").exists():
        assert grid.run_variant([*py, adj], env, 30, out) is None
        assert out.read_text().strip() == "1000"
        out.unlink()
    slow = grid.run_variant([*py, "import time; time.sleep(30)"], env, 1, out)
    assert slow["status"] == "timeout" and slow["timeout_s"] == 1
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert grid.run_variant([*py, killed], env, 30, out)["status"] == "out of memory"
    bad = grid.run_variant([*py, "import sys; sys.exit('no model')"], env, 30, out)
    assert bad["status"] == "failed" and "no model" in bad["stderr"]


def test_grid_flop_ratios_by_hand():
    """The others' model FLOPs over mlx_dpo's, hand-derived for a 1-block model (hidden 4, one
    head, 7 linears of 4 x 4 = 112 weights, LoRA r=8: 448), 1 pair of 4 tokens (a prompt of 2,
    answers of 2).
      mlx_dpo, one row prompt | chosen | rejected of 6 tokens: 5 positions, 2 answers x 2
                completion tokens scored, attention 4 x 1 row x 1 head x 5^2 x 4 = 400;
                head 2*10*4*4 = 320; base 2*112*5 + 320 = 1440;
                forward 1440 + 400 + 2*448*5 = 6320; backward 1440 + 800 + 4*448*5 = 11200
      the others, 2 rows x 3 positions = 6 tokens, attention 4 x 2 x 1 x 3^2 x 4 = 288:
      full logits: head 2*10*4*6 = 480; base 2*112*6 + 480 = 1824;
                forward 1824 + 288 + 2*448*6 = 7488; backward 1824 + 576 + 4*448*6 = 13152
      plus a reference forward: 1824 + 288 = 2112"""
    sys.path.insert(0, str(BENCH.parent))
    from common import Spec

    grid = _grid()
    spec = Spec(4, 1, 1, 1, 4, 10)
    got = grid.flop_ratios(spec, 4, 1)
    assert got["ours"] == 6320 + 11200
    assert got["full_logits"] == pytest.approx(20640 / 17520)
    assert got["reference_every_update"] == pytest.approx((20640 + 2112) / 17520)
    point = {"model": "5m", "length": 4, "pairs": 1, "dtype": "fp32", "cells": {}, "flops": got}
    header, _, row = grid.markdown([point], grid.VARIANTS).splitlines()
    cells = dict(zip(header.split("|"), row.split("|"), strict=True))
    assert cells[" FLOPs mlx-lm-lora (and TRL) / ours "].strip() == "1.30x"


def test_profile_point_groups_and_per_update_seconds():
    """The profile's shared objects go to the groups the table names (names as `perf report`
    prints them), and the steady seconds per update are the long run's samples less the short
    run's, at 999 samples per CPU second, over the updates only the long run did."""
    _grid()
    import profile_point as pp

    names = {
        "libmkl_def.so.3": "blas",
        "libscipy_openblas.so": "blas",
        "libFf4IBroadcastBGf4ISubtractAFH_VVCCC_f4f4_9890204067157363224_strided_2.so": (
            "mlx fused kernels"
        ),
        "libDi4IAsTypeAEi4IBroadcastBFi4OLeftShiftFG_VCC_f4_8610265000885327642_contiguous.so": (
            "mlx fused kernels"
        ),
        "libmlx.so": "mlx library",
        "libtorch_cpu.so": "torch",
        "libpython3.11.so.1.0": "python",
        "libc.so.6": "c runtime",
        "[kernel.kallsyms]": "os",
        "libz.so.1": "other",
    }
    assert {n: pp.group_of(n) for n in names} == names
    report = (
        "# Samples: 3K\n"
        "   900|libmkl_def.so.3 |[.] mkl_blas_avx512_sgemm_kernel_0\n"
        "   100|libmkl_def.so.3 |[.] mkl_blas_avx512_sgemm_scopy_right8_ea\n"
        "    40|libmlx.so |[.] mlx::core::copy_general_general<float, float>\n"
        "     2|[kernel.kallsyms] |[k] clear_page_erms\n"
    )
    groups, functions = pp.samples_from_report(report)
    assert groups == {"blas": 1000, "mlx library": 40, "os": 2}
    assert functions["libmlx.so: copy_general_general<float, float>"] == 40
    assert sum(functions.values()) == 1042 and len(functions) == 4
    got = pp.per_update({"blas": 999 * 12, "python": 500}, {"blas": 999 * 2, "os": 99}, 10)
    assert got == pytest.approx({"blas": 1.0, "python": 500 / 999 / 10, "os": -99 / 999 / 10})


def test_profile_point_names_functions_and_fused_kernels():
    """--symbols names a fused kernel by the ops its library name lists (broadcasts left
    out), and a C++ function without MLX's and the standard library's namespaces."""
    _grid()
    import profile_point as pp

    kernel = "libFf4IBroadcastBGf4ISubtractAFHf4IMultiplyGHJf4OMinimumKL_VVCCC_f4f4_16652194_strided_2.so"
    assert (
        pp.symbol_name(kernel, "[.] Ff4IBroadcastBG...")
        == "fused: Subtract Multiply Minimum (strided)"
    )
    bits = "libDi4IAsTypeAEi4IBroadcastBFi4OLeftShiftFG_VCC_f4_8610265000885327642_contiguous.so"
    assert pp.fused_ops(bits) == "AsType LeftShift"
    assert pp.fused_ops("libmlx.so") is None
    name = pp.symbol_name(
        "libmlx.so ", " [.] mlx::core::(anonymous namespace)::copy_general_general<float, float>"
    )
    assert name == "libmlx.so: copy_general_general<float, float>"
    assert pp.symbol_name("[kernel.kallsyms]", "[k] clear_page_erms") == (
        "[kernel.kallsyms]: clear_page_erms"
    )


def test_ablate_step_stand_ins_reach_the_model_and_are_undone(tiny_model_path, monkeypatch):
    """Each part's stand-in changes what the model computes (so its time is that part's),
    leaving the context restores the model, and the script times every part."""
    import mlx.core as mx

    monkeypatch.syspath_prepend(str(BENCH.parent))
    import ablate_step
    import mlx_worker

    net, _ = mlx_worker.load_model(str(tiny_model_path))
    tokens = mx.array([[1, 5, 9, 2, 7, 3, 4, 8]])
    whole = net(tokens)
    parts = ablate_step.ablations(net)
    assert {"rope", "norms", "attention", "swiglu"} <= set(parts)
    for name, context in parts.items():
        with context():
            got = net(tokens)
        changed = not mx.allclose(got, whole, atol=1e-5).item()
        assert changed == (name not in ("whole step", "optimizer")), name
        assert mx.array_equal(net(tokens), whole).item(), name
    args = [str(tiny_model_path), "--pairs", "1", "--length", "16", "--rounds", "1"]
    out = ablate_step.main([*args, "--steps", "1"])
    assert set(out["parts"]) == set(parts)
    assert all(row["s"] > 0 for row in out["parts"].values())


def test_gemm_shapes_roles_and_per_update_calls():
    """Each GEMM shape goes to the part of SmolLM2-135M its dimensions name, and the per-update
    figures are the long run's less the short run's, over the updates only the long run did."""
    _grid()
    import gemm_shapes as gs
    from common import SPECS

    spec = SPECS["smollm2-135m"]  # hidden 576, intermediate 1536, 9 heads / 3 K/V heads of 64
    roles = {
        "111 111 384 8 576 576 8 0": "LoRA (rank 8)",  # x @ A
        "112 111 8 1536 384 8 1536 0": "LoRA (rank 8)",  # dB
        "111 112 256 49152 576 576 576 0": "output layer",  # the whole head
        "111 112 256 2048 576 576 576 0": "output layer",  # one vocabulary tile
        "111 112 384 64 128 64 64 0": "attention",  # probabilities @ V
        "112 111 64 127 127 64 127 0": "attention",  # Q^T @ dS (mlx-lm's backward)
        "111 112 384 192 576 576 576 0": "frozen projections",  # k_proj
        "111 111 384 576 1536 1536 576 0": "frozen projections",  # down_proj
        "111 111 100 200 300 300 200 0": "other",
    }
    assert {k: gs.role(k, spec) for k in roles} == roles
    long = {"a": (130.0, 13.0), "b": (7.0, 0.5)}
    short = {"a": (30.0, 3.0), "b": (7.0, 0.5), "c": (1.0, 0.1)}
    assert gs.shapes_per_update(long, short, 10) == {"a": pytest.approx((10.0, 1.0))}
    assert gs.flops("111 111 2 3 4 4 3 0") == 48


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD interposer: Linux only")
def test_gemm_shapes_interposer_sees_mlx_matmuls(tmp_path):
    """The interposer, preloaded, logs each of MLX's fp32 matmuls once, with its shape and
    transpose flags, and leaves the result as the BLAS computes it."""
    _grid()
    import gemm_shapes as gs

    shim = gs.build_shim(tmp_path)
    log = tmp_path / "gemm.log"
    script = (
        "from mlx_dpo import _blas; _blas.preload()\n"
        "import mlx.core as mx, numpy as np\n"
        "a, b, c = mx.ones((64, 32)), mx.ones((32, 16)), mx.ones((24, 32))\n"
        "for _ in range(3): mx.eval(a @ b)\n"
        "r = a @ c.T\n"
        "assert np.allclose(np.array(r), 32.0), r\n"
    )
    env = {**os.environ, "LD_PRELOAD": str(shim), "GEMMLOG": str(log)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    calls = {" ".join(k.split()[:5]): v[0] for k, v in gs.read_log(log).items()}
    assert calls == {"111 111 64 16 32": 3.0, "111 112 64 24 32": 1.0}


def test_grid_mlx_adapts_only_the_lora_keys_asked(tiny_model_path, tmp_path):
    """--lora-keys puts adapters on those projections only: rank x (in + out) parameters per
    adapted projection per block, counted by hand from the tiny model's config."""
    _grid()
    import grid_mlx

    cfg = json.loads((tiny_model_path / "config.json").read_text())
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    run = [str(tiny_model_path), "--pairs", "1", "--length", "32", "--warmup", "1", "--steps", "1"]
    both = grid_mlx.main([*run, "--lora-keys", "self_attn.q_proj", "self_attn.k_proj",
                          "--json", str(tmp_path / "qk.json")])  # fmt: skip
    assert both["trainable_parameters"] == layers * 8 * ((d + d) + (d + kv))
    every = grid_mlx.main([*run, "--json", str(tmp_path / "all.json")])
    assert every["trainable_parameters"] > both["trainable_parameters"]


def test_grid_mlx_plan_only_writes_the_plan_a_run_makes(tiny_model_path, tmp_path):
    """--plan-only stops after the plan: the same plan as the full run of the point (the same
    forced kernels), and nothing timed or trained."""
    _grid()
    import grid_mlx

    run = [str(tiny_model_path), "--pairs", "2", "--length", "64", "--kernels", "all=on"]
    run += ["--warmup", "1", "--steps", "1"]
    planned = grid_mlx.main([*run, "--plan-only", "--json", str(tmp_path / "plan.json")])
    full = grid_mlx.main([*run, "--json", str(tmp_path / "run.json")])
    assert planned["plan"]["arrays"] == full["plan"]["arrays"] > 0
    assert planned["plan"]["parts"].keys() == full["plan"]["parts"].keys()
    assert "step_s_min" in full and "step_s_min" not in planned
    assert json.loads((tmp_path / "plan.json").read_text())["plan"] == planned["plan"]


def test_grid_mlx_turns_on_grad_checkpoint_where_the_plan_does_not_fit(tmp_path, monkeypatch):
    """Where `mlx_dpo train` would refuse the point and offer --grad-checkpoint, the grid runs
    it so: between the two plans' needs checkpointing is turned on (in the model too), above
    both nothing changes, below both it is refused."""
    _grid()
    import grid_mlx
    import mlx.core as mx
    from common import Geometry
    from mlx_worker import load_model, make_batch
    from tiny import build_tiny_model

    from mlx_dpo import memory
    from mlx_dpo import model as model_lib
    from mlx_dpo.config import TrainConfig
    from mlx_dpo.config_values import ConfigError

    deep = build_tiny_model(tmp_path / "deep", num_layers=8)  # deep enough to gain by it

    def fresh(ckpt=False):
        net, _ = load_model(deep, None)
        cfg = TrainConfig(num_layers=-1, lora_rank=8, batch_size=2, grad_checkpoint=ckpt)
        model_lib.apply_adapters(net, cfg, seed=0)
        return net, cfg

    pairs, _ = make_batch(Geometry(2, 256, 256), 256, 0)
    monkeypatch.setattr(memory, "runtime_bytes", lambda: 100 << 20)  # not the live heap's
    memory.plan_for_pairs(*fresh(), pairs)  # the kernels decided (and cached) first
    need = {}
    for ckpt in (False, True):
        net, cfg = fresh(ckpt)
        mx.clear_cache()  # the allocator's cache is a live part of the plan
        need[ckpt] = memory.plan_for_pairs(net, cfg, pairs).step_resident_bytes
    gap = need[False] - need[True]
    assert gap > 0, need
    net, cfg = fresh()
    mx.clear_cache()
    got, plan, refused = grid_mlx.fit_or_checkpoint(net, cfg, pairs, need[False] + gap // 2)
    assert not got.grad_checkpoint and refused is None
    mx.clear_cache()
    got, plan, refused = grid_mlx.fit_or_checkpoint(net, cfg, pairs, need[True] + gap // 2)
    assert got.grad_checkpoint and plan.grad_checkpoint and "--grad-checkpoint" in refused
    assert getattr(type(net.layers[0]), "_mlx_dpo_checkpointed", False)  # the model's too
    with pytest.raises(ConfigError):
        grid_mlx.fit_or_checkpoint(*fresh(), pairs, need[True] // 2)


def test_memory_calibration_measures_both_layouts_and_each_adapter_call():
    """One geometry in the two-row and the shared-prompt layout, with the fused adapters and
    SwiGLU, mlx-lm's adapters, and MLX's SwiGLU: each row says what it measured, with which
    kernels, and what the plan said, and the plan of a tiny step lands near the allocator's
    peak (the fit's input)."""
    _grid()
    import memory_calibration as mc
    from common import Geometry, Spec

    from mlx_dpo import kernel_choice as kc

    spec, geo = Spec(128, 1, 2, 1, 352, 1024), Geometry(1, 64, 64)
    kernels = [("fused", "fused"), ("mlx", "fused"), ("fused", "mlx")]  # (lora, swiglu)
    rows = []
    for lora, swiglu in kernels:
        kc.reset(kc.Chooser(None, kc.parse_override(f"all=on,lora={lora},swiglu={swiglu}")))
        try:
            rows += [
                r
                for shared in (False, True)
                for r in mc.measure(spec, [geo], ("lean",), None, shared)
            ]
        finally:
            kc.reset()
    assert [(r["lora"], r["swiglu"], r["shared"], r["ckpt"]) for r in rows] == [
        (*k, shared, ckpt) for k in kernels for shared in (False, True) for ckpt in (False, True)
    ]
    two_rows, shared = rows[0], rows[2]
    assert (two_rows["T"], two_rows["T_att"]) == (128, 128)  # prompt + answer
    assert (shared["T"], shared["T_att"]) == (192, 128)  # prompt + both answers; each its own
    for r in rows:
        assert 0.6 < r["planned_mb"] / r["measured_peak_mb"] < 1.6, r
        assert mc._predicted_above(r, r["ckpt"], "fast") > 0


def test_memory_calibration_fit_recovers_the_factors_it_was_given(monkeypatch):
    """Working memory made by the estimate itself, with known factors, over the full grid's
    and depth grids' geometries (both layouts, each kernel set): the fit, started elsewhere,
    lands on factors that predict it again, each step and each depth pair's difference, the
    extra of MLX's SwiGLU among them."""
    _grid()
    import copy

    import memory_calibration as mc

    from mlx_dpo import cpu_kernels, memory, memory_factors

    if not cpu_kernels.enabled():
        pytest.skip("the fast factors are fitted where the CPU kernels run")
    for name in ("FACTORS", "_ADAPTER_EXTRA", "_SWIGLU_EXTRA"):  # the fit writes into them
        monkeypatch.setattr(memory_factors, name, copy.deepcopy(getattr(memory_factors, name)))
    truth = {False: {"saved": 0.8, "layer": 1.3}, True: {"saved": 0.0, "layer": 1.7}}
    memory_factors._SWIGLU_EXTRA.update(copy.deepcopy(truth))
    rows = []
    for spec, geos, paths, quantize in mc.GRIDS["full"] + mc.GRIDS["depth"]:
        if paths != ("lean",) or quantize:
            continue
        for geo, shared, ckpt, kernels in itertools.product(
            geos, (False, True), (False, True), [("fused", "fused"), ("fused", "mlx")]
        ):
            T = geo.prompt_len + 2 * geo.completion_len if shared else geo.row_tokens
            r = {
                "spec": vars(spec), "rows": geo.rows, "T": memory._padded(T),
                "C": geo.completion_len, "T_att": memory._padded(geo.row_tokens),
                "shared": shared, "lora": kernels[0], "swiglu": kernels[1], "ckpt": ckpt,
                "logps": "lean", "quantize": None,
            }  # fmt: skip
            r["measured_above_mb"] = mc._predicted_above(r, ckpt, "fast") / 2**20
            rows.append(r)
    memory_factors._SWIGLU_EXTRA.update({c: {"saved": 3.0, "layer": 3.0} for c in truth})
    for table in memory_factors.FACTORS["fast"].values():  # every start away from the truth
        for factors in table.values():
            factors.update({k: 1.3 * v + 0.1 for k, v in factors.items()})
    fitted = mc.fit(rows)
    errors = [
        mc._predicted_above(r, r["ckpt"], "fast") / 2**20 / r["measured_above_mb"] - 1 for r in rows
    ]
    # the estimate's parts are whole bytes: a fit whose finite differences move them by less
    # than one never leaves its start (0.07 here from the starts above, 0.001 now)
    assert max(map(abs, errors)) < 0.01
    # the depth pairs' slopes without checkpointing (with it the peak moves within the update)
    assert fitted["False"]["depth_pairs"] >= len(mc.GRIDS["depth"])
    assert max(map(abs, fitted["False"]["slope_err"])) < 0.05
    assert fitted["True"]["depth_pairs"] == 0
    # per block and in one block's working set both scale with tokens x width: told apart by
    # the models' depths alone, so recovered only roughly
    assert fitted["False MLX's SwiGLU"]["factors"]["saved"] == pytest.approx(0.8, abs=0.1)


def test_memory_calibration_depth_grid_varies_the_blocks_alone():
    """`--grid depth` (RESULTS.md 1q, 1s) separates the per-block factors from the constant only
    if each of its models has a twin, in it or in the full grid, that differs in its number of
    blocks and nothing else; the fit pairs exactly those steps."""
    _grid()
    import dataclasses

    import memory_calibration as mc

    def kind(item):
        spec, geos, paths, quantize = item
        return dataclasses.replace(spec, num_hidden_layers=1), tuple(geos), paths, quantize

    both = mc.GRIDS["depth"] + mc.GRIDS["full"]
    for item in mc.GRIDS["depth"]:
        depths = {twin[0].num_hidden_layers for twin in both if kind(twin) == kind(item)}
        assert len(depths) >= 2 and max(depths) >= 4 * min(depths), item
    # `--grid deep`: the depth grid's last width at the grid's 30 blocks, its steps growing
    (spec, geos, _, _), *more = mc.GRIDS["deep"]
    assert not more and spec.num_hidden_layers == 30
    assert dataclasses.replace(spec, num_hidden_layers=1) == kind(mc.GRIDS["depth"][-1])[0]
    tokens = [g.pairs * (g.prompt_len + 2 * g.completion_len) for g in geos]
    assert tokens == sorted(set(tokens))
    # the pairs: each step against the shallowest step of its kind, none across kinds
    row = {"rows": 2, "T": 128, "C": 64, "T_att": 128, "shared": False, "ckpt": False,
           "lora": "fused", "swiglu": "fused", "logps": "lean", "quantize": None}  # fmt: skip
    spec = vars(mc.GRIDS["deep"][0][0])
    sel = [
        {**row, "spec": {**spec, "num_hidden_layers": 8}},
        {**row, "spec": {**spec, "num_hidden_layers": 2}},
        {**row, "spec": {**spec, "num_hidden_layers": 16}},
        {**row, "spec": {**spec, "num_hidden_layers": 16}, "T": 256},
        {**row, "spec": {**spec, "num_hidden_layers": 2}, "ckpt": True},
        {**row, "spec": {**spec, "num_hidden_layers": 8, "hidden_size": 512}},
    ]
    assert sorted(mc._depth_pairs(sel)) == [(1, 0), (1, 2)]


def test_gemm_packed_times_three_calls_of_the_same_product():
    """benchmarks/gemm_packed.py (RESULTS.md 1n) times what it says: the plain, transposed and
    pre-packed calls each write x W^T."""
    sys.path.insert(0, str(BENCH.parent))
    import gemm_packed

    try:
        lib = gemm_packed._mkl()
    except SystemExit:
        pytest.skip("no libmkl_rt in this environment")
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((37, 19), np.float32), rng.standard_normal((23, 19), np.float32)
    calls = gemm_packed.products(lib, x, w)
    assert list(calls) == list(gemm_packed.NAMES)
    for fn, y in calls.values():
        fn()
        np.testing.assert_allclose(
            y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4
        )


def test_attention_value_times_every_candidate_both_ways(capsys, monkeypatch):
    """benchmarks/attention_value.py (RESULTS.md 1p): MLX's attention and every flash tile,
    each timed with the gradient alone and with the value, one row per candidate and shape."""
    sys.path.insert(0, str(BENCH.parent))
    import attention_value

    monkeypatch.setattr(attention_value, "SHAPES", [(1, 4, 2, 40, 8)])
    attention_value.main()
    rows = [r.split(" | ") for r in capsys.readouterr().out.splitlines()[1:]]
    assert [r[1] for r in rows] == ["mlx", *cpu_kernels.FLASH_BLOCKS]
    assert all(r[0] == "1 x 4 (2) x 40 x 8" and float(r[2]) > 0 < float(r[3]) for r in rows)
