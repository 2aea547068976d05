"""`mlx_dpo iterate` on the bundled demo model with small settings: pairs follow the reward
(chosen = best-scored sample, rejected = worst), rounds resume exactly after a failing reward or
a failed training write, a failing reward is one line and exit 2 with the saved samples kept,
the pairs file is valid --data, and a round that starts from adapters keeps the base model as
its reference."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_dpo import demo, onpolicy
from mlx_dpo.cli import main
from mlx_dpo.errors import RunError
from mlx_dpo.iterate import run_iterate
from mlx_dpo.iterate_config import resolve
from mlx_dpo.rewards import RewardError, parse_score

REWARD_MODULE = '''
import os

calls = 0


def text(c):
    return c if isinstance(c, str) else c[0]["content"]


def sorry(prompts, completions, **fields):
    """1 for an answer that says Sorry (a token the demo model uses half of the time)."""
    global calls
    calls += 1
    if os.environ.get("FAIL_ON_CALL") == str(calls):
        raise ValueError("checker crashed")
    return [float("Sorry" in text(c)) for c in completions]


def short(prompts, completions, **fields):
    return [0.0] * (len(completions) - 1)


def with_answer(prompts, completions, answer, **fields):
    return [float(a in text(c)) for c, a in zip(completions, answer)]
'''


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with a reward module, 8 demo prompts and a private reference cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FAIL_ON_CALL", raising=False)
    name = f"rewards_{tmp_path.name.replace('-', '_')}"  # a fresh module per test
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(REWARD_MODULE))
    lines = (demo.DATA_DIR / "train.jsonl").read_text().splitlines()[:8]
    rows = [json.loads(line) for line in lines]
    prompts = tmp_path / "prompts.jsonl"  # messages, and an extra field for the reward
    prompts.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "answer": r["chosen"][0]["content"][:1]}) + "\n"
            for r in rows
        )
    )
    return {"root": tmp_path, "module": name, "prompts": prompts}


def flags(work, run="run", **extra) -> dict:
    base = {
        "model": str(demo.MODEL_DIR),
        "prompts": str(work["prompts"]),
        "reward": f"{work['module']}:sorry",
        "adapter_path": str(work["root"] / run),
        "rounds": 2,
        "samples": 4,
        "max_tokens": 16,
        "sample_batch": 4,
        "iters": 4,
        "batch_size": 2,
        "learning_rate": 3e-4,  # round 2 still has prompts answered both ways
        "max_length": 64,
        "steps_per_report": 1,
        "steps_per_eval": 0,
        "save_every": 2,
        "valid_fraction": 0.0,
    }
    return {**base, **extra}


def run(work, **extra):
    icfg, cfg, state = resolve(flags(work, **extra))
    return run_iterate(icfg, cfg, state, log=lambda *_: None)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*args):
    return CliRunner().invoke(main, ["iterate", *map(str, args)])


def as_args(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


# ---------------------------------------------------------------------------------------------


def test_pairs_follow_a_reward_that_prefers_a_known_token(work):
    state = run(work, rounds=1)
    samples = read_jsonl(work["root"] / "run/round-1/samples.jsonl")
    pairs = read_jsonl(work["root"] / "run/round-1/pairs.jsonl")
    # the reward is 1 exactly for answers containing "Sorry": recomputed here from the texts
    for s in samples:
        assert s["reward"] == float("Sorry" in s["completion"])
    by_prompt: dict[str, list[str]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s["completion"])
    mixed = [p for p, texts in by_prompt.items() if len({"Sorry" in t for t in texts}) == 2]
    assert pairs, "the demo model answers both ways: some prompt must give a pair"
    assert [p["prompt_source"] for p in pairs] == mixed  # ties (all or none say Sorry) dropped
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert "Sorry" in chosen and "Sorry" not in rejected
        assert (p["score_chosen"], p["score_rejected"]) == (1.0, 0.0)
        texts = by_prompt[p["prompt_source"]]  # best and worst are the first of their score
        assert chosen == next(t for t in texts if "Sorry" in t)
        assert rejected == next(t for t in texts if "Sorry" not in t)
    report = state["rounds"][0]
    assert report["kept"] == len(mixed)
    assert report["dropped"] == ({"all equal": 8 - len(mixed)} if len(mixed) < 8 else {})
    assert report["mean_reward"] == pytest.approx(np.mean([s["reward"] for s in samples]))
    assert (work["root"] / "run/adapters.safetensors").is_file()  # the newest round's, published
    (work["root"] / "run/rounds.png").unlink()
    result = CliRunner().invoke(main, ["plot", str(work["root"] / "run")])
    assert result.exit_code == 0 and (work["root"] / "run/rounds.png").stat().st_size > 10_000


def test_make_pairs_ties_margins_and_unscored():
    rows = [onpolicy.PromptRow(f"q{i}", {}, f"p:{i}") for i in range(5)]
    rewards = [
        [0.1, 0.9, 0.9, 0.5],  # best: the first 0.9 (index 1); worst: index 0
        [0.3, 0.3, 0.3, 0.3],  # all equal
        [0.5, 0.6, None, 0.55],  # margin 0.1 < 0.2
        [None, None, 2.0, None],  # one scored
        [1.0, -1.0, None, 0.0],  # margin 2
    ]
    samples = [
        {"completion": f"a{i}{k}", "reward": w}
        for i, ws in enumerate(rewards)
        for k, w in enumerate(ws)
    ]
    pairs, stats = onpolicy.make_pairs(
        rows, samples, n=4, min_margin=0.2, target=0.9, as_messages=False
    )
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a01", "a00"), ("a40", "a41")]
    assert dict(stats.dropped) == {
        "all equal": 1,
        "margin below --min-margin": 1,
        "fewer than 2 scored": 1,
    }
    scored = [w for ws in rewards for w in ws if w is not None]
    assert stats.scored == len(scored) and stats.mean_reward == pytest.approx(np.mean(scored))
    assert stats.target_share == pytest.approx(3 / 5)  # prompts 0, 3 (2.0) and 4 (1.0)
    # a string prompt sampled through the chat template is written as messages
    msg_pairs, _ = onpolicy.make_pairs(
        rows, samples, n=4, min_margin=0, target=None, as_messages=True
    )
    assert msg_pairs[0]["prompt"] == [{"role": "user", "content": "q0"}]
    assert msg_pairs[0]["chosen"] == [{"role": "assistant", "content": "a01"}]


def test_samples_file_keeps_whole_batches_only(tmp_path):
    """A kill in the middle of appending a batch: that batch is sampled again on resume."""
    file = tmp_path / "samples.jsonl"
    onpolicy.append_chunk(file, [{"chunk": 0, "reward": 1.0}, {"chunk": 0, "reward": 0.0}])
    onpolicy.append_chunk(file, [{"chunk": 1, "reward": 1.0}])  # 1 of its 2 records
    with open(file, "a") as f:
        f.write('{"chunk": 1, "rew')  # cut short
    done = onpolicy.read_chunks(file, [2, 2, 2])
    assert [len(c) for c in done] == [2]
    assert [json.loads(line)["chunk"] for line in file.read_text().splitlines()] == [0, 0]


def test_rounds_resume_exactly(work, monkeypatch):
    run(work, run="straight")
    sys.modules[work["module"]].calls = 0  # count the reward's calls from the next run on
    # a reward that fails in round 2 (its 2nd sampling batch), then a training write that
    # fails at update 3 of round 1 (after the checkpoint of update 2) on the second try
    monkeypatch.setenv("FAIL_ON_CALL", "4")  # 2 batches a round: round 2, batch 2
    monkeypatch.setenv("MLX_DPO_TEST_FAIL", "update:3")
    with pytest.raises(OSError):
        run(work, run="resumed")
    state = json.loads((work["root"] / "resumed/iterate.json").read_text())
    assert (state["round"], state["phase"]) == (1, "train")
    monkeypatch.delenv("MLX_DPO_TEST_FAIL")
    with pytest.raises(RewardError, match="batch 2"):
        run(work, run="resumed", resume=True)
    state = json.loads((work["root"] / "resumed/iterate.json").read_text())
    assert (state["round"], state["phase"]) == (2, "sample")
    saved = read_jsonl(work["root"] / "resumed/round-2/samples.jsonl")
    assert {s["chunk"] for s in saved} == {0}  # the batch scored before the failure is kept
    monkeypatch.delenv("FAIL_ON_CALL")
    run(work, run="resumed", resume=True)
    for name in ("round-1/samples.jsonl", "round-1/pairs.jsonl", "round-2/pairs.jsonl"):
        a, b = (work["root"] / d / name for d in ("straight", "resumed"))
        assert a.read_text() == b.read_text(), name
    a, b = (
        mx.load(str(work["root"] / d / "adapters.safetensors")) for d in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_failing_reward_is_one_line_and_keeps_the_samples(work, monkeypatch):
    monkeypatch.setenv("FAIL_ON_CALL", "2")
    result = cli(*as_args(flags(work, rounds=1)))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert (
        f"reward {work['module']}:sorry raised ValueError: checker crashed on batch 2" in lines[0]
    )
    assert "prompts.jsonl:5 to " in lines[0] and "--resume" in lines[0]
    assert {s["chunk"] for s in read_jsonl(work["root"] / "run/round-1/samples.jsonl")} == {0}

    result = cli(*as_args(flags(work, run="short", reward=f"{work['module']}:short", rounds=1)))
    assert result.exit_code == 2
    assert "returned 15 values for the 16 completions of batch 1" in result.output
    assert len(result.output.strip().splitlines()[-1:]) == 1

    result = cli(*as_args(flags(work, run="x", reward=f"{work['module']}:nope")))
    assert result.exit_code == 2 and "has no function nope" in result.output


def test_row_fields_reach_the_reward_and_pairs_pass_data_check(work):
    state = run(work, rounds=1, reward=f"{work['module']}:with_answer")
    assert state["rounds"][0]["scored"] == 32
    pairs_file = work["root"] / "run/round-1/pairs.jsonl"
    pairs = read_jsonl(pairs_file)
    result = CliRunner().invoke(
        main, ["data", "check", "--data", str(pairs_file), "--model", str(demo.MODEL_DIR)]
    )
    assert result.exit_code == 0, result.output
    assert f"TRL conversational (lists of messages) ({len(pairs)} rows)" in result.output
    from mlx_dpo.data_sources import load_splits

    rows = load_splits(str(pairs_file), valid_fraction=0, min_score_margin=0.5)["train"]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (p["prompt"], p["chosen"], p["rejected"]) for p in pairs
    ]
    assert [r["margin"] for r in rows] == [p["score_chosen"] - p["score_rejected"] for p in pairs]


def test_reference_modes_and_the_start_adapter(work):
    """--reference start: round 2's policy starts from round 1's adapters but its reference is
    the base, so a step on its pairs reports the DPO loss of (round-1 policy vs base), computed
    here independently; --reference previous: round 1's adapters are round 2's init adapter,
    part of its reference, so its first loss is ln 2."""
    from mlx_dpo import model as model_lib
    from mlx_dpo import reference
    from mlx_dpo.config import TrainConfig
    from mlx_dpo.data import load_splits, tokenize_rows
    from mlx_dpo.run import run_training

    run(work, run="start")
    run(work, run="prev", reference="previous")
    r1, r2 = work["root"] / "start/round-1", work["root"] / "start/round-2"
    saved = json.loads((r2 / "train/run.json").read_text())["settings"]
    assert saved["start_adapter"] == str((r1 / "train").resolve())
    assert saved["init_adapter"] is None
    prev = work["root"] / "prev/round-2/train"
    prev_saved = json.loads((prev / "run.json").read_text())["settings"]
    assert prev_saved["init_adapter"] == str((work["root"] / "prev/round-1/train").resolve())
    assert prev_saved["start_adapter"] is None
    prev_first = next(m for m in read_jsonl(prev / "metrics.jsonl") if m["split"] == "train")
    assert prev_first["loss"] == pytest.approx(math.log(2), abs=1e-5)

    # one update over all of round 2's pairs at once, from round 1's adapters
    pairs_file = r2 / "pairs.jsonl"
    rows = load_splits(str(pairs_file), valid_fraction=0)["train"]
    cfg = TrainConfig(
        model=str(demo.MODEL_DIR),
        data=str(pairs_file),
        start_adapter=str(r1 / "train"),
        adapter_path=str(work["root"] / "check"),
        batch_size=len(rows),
        iters=1,
        max_length=64,
        valid_fraction=0,
        steps_per_eval=0,
        demo_summary=False,
    )
    run_training(cfg, log=lambda *_: None)
    reported = read_jsonl(work["root"] / "check/metrics.jsonl")[0]

    loaded = model_lib.load(str(demo.MODEL_DIR))
    pairs, _ = tokenize_rows(rows, loaded.tokenizer, max_length=64, progress=False)
    ref_c, ref_r = reference.pair_logps(loaded.model, pairs, batch_size=8)
    model_lib.load_adapter_dir(loaded.model, r1 / "train")
    pol_c, pol_r = reference.pair_logps(loaded.model, pairs, batch_size=8)
    logits = 0.1 * ((pol_c - ref_c) - (pol_r - ref_r)).astype(np.float64)
    expected = float(np.mean(np.logaddexp(0.0, -logits)))  # -log sigmoid
    assert abs(expected - math.log(2)) > 1e-3  # the start adapter moved the policy off the base
    assert reported["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_parse_score():
    assert parse_score("Score: 7/10") == 7.0
    assert parse_score(" 8.5") == 8.5
    assert parse_score("no idea") is None


def test_judge_model_scores_samples(work, tmp_path):
    template = tmp_path / "judge.txt"
    template.write_text("Say a number for: {prompt} -> {completion}")
    state = run(
        work,
        rounds=1,
        reward=None,
        judge_model=str(demo.MODEL_DIR),
        judge_template=str(template),
        iters=1,
    )
    samples = read_jsonl(work["root"] / "run/round-1/samples.jsonl")
    assert all(s["reward"] is None or isinstance(s["reward"], float) for s in samples)
    assert state["rounds"][0]["scored"] == sum(s["reward"] is not None for s in samples)


def test_settings_errors_are_one_line(work):
    bad = [
        ({"reward": "nocolon"}, "expected module:function"),
        ({"reward": "no_such_module_x:f"}, "cannot import no_such_module_x"),
        ({"judge_model": str(demo.MODEL_DIR)}, "give --reward or --judge-model, not both"),
        ({"reward": None, "prompts": None}, "--prompts is required"),
    ]
    for extra, message in bad:
        values = {k: v for k, v in flags(work, **extra).items() if v is not None}
        result = cli(*as_args(values))
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output and "Traceback" not in result.output
    (work["root"] / "taken").mkdir()
    (work["root"] / "taken/notes.txt").write_text("mine")
    result = cli(*as_args(flags(work, run="taken")))
    assert result.exit_code == 2 and "not empty; pass --resume" in result.output
    assert (work["root"] / "taken/notes.txt").read_text() == "mine"
    config = work["root"] / "it.yaml"
    config.write_text("rounds: 1\nsamples: 3\nlearning_rate: 1e-4\nbogus: 1\n")
    result = cli("--config", config, *as_args(flags(work)))
    assert result.exit_code == 2 and "unknown setting(s) bogus" in result.output


def test_resume_refuses_other_settings(work):
    run(work, rounds=1)
    with pytest.raises(RunError, match="samples: saved 4, given 3"):
        resolve(flags(work, samples=3, resume=True))
    icfg, cfg, state = resolve(flags(work, rounds=2, resume=True))  # more rounds: allowed
    assert (icfg.rounds, state["round"], state["phase"]) == (2, 2, "sample")


@pytest.mark.slow
def test_the_demo_raises_the_preferred_share_to_90_percent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path / "cache"))
    icfg, cfg, _ = resolve({})  # no arguments: the demo
    assert cfg.adapter_path == "runs/iterate" and icfg.eval_prompts
    lines = []
    state = run_iterate(icfg, cfg, log=lines.append)
    before, after = state["before"], state["rounds"][-1]["eval"]
    assert 0.3 <= before["sample_target_share"] <= 0.6  # the base answers both ways
    assert after["sample_target_share"] >= 0.9
    assert any("sampled answers with the preferred behaviour" in line for line in lines)


@pytest.mark.slow
def test_kill_9_during_a_round_s_training_then_resume(work):
    """A real kill -9 inside round 1's training (paused after update 3) and --resume: the run
    finishes with the adapters of a run that was never stopped."""
    import os
    import signal
    import subprocess
    import time

    run(work, run="straight")
    pause = work["root"] / "paused"
    env = {**os.environ, "MLX_DPO_TEST_PAUSE": "update:3", "MLX_DPO_TEST_PAUSE_FILE": str(pause)}
    command = [sys.executable, "-m", "mlx_dpo", "iterate", *as_args(flags(work, run="killed"))]
    proc = subprocess.Popen(command, env=env, cwd=work["root"], stdout=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not pause.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert pause.exists(), "the run never reached update 3"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    env.pop("MLX_DPO_TEST_PAUSE")
    done = subprocess.run(
        [*command, "--resume"], env=env, cwd=work["root"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (mx.load(str(work["root"] / d / "adapters.safetensors")) for d in ("straight", "killed"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
