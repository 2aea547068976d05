"""Kernel selection (mlx_dpo.kernel_choice) with injected timings: no timed assertions."""

from __future__ import annotations

import json

import pytest

from mlx_dpo import kernel_choice as kc
from mlx_dpo.config import ConfigError


def test_decide_takes_a_fast_kernel_only_when_it_wins_clearly():
    # best times: baseline 1.00, fast 0.96 -> within the 5% margin: keep MLX's op
    assert kc.decide({"mlx": [1.2, 1.0], "flash": [0.96, 1.5]}) == "mlx"
    assert kc.decide({"mlx": [1.0], "flash": [0.94]}) == "flash"
    # a slower kernel is never picked, whatever its worst time
    assert kc.decide({"mlx": [1.0, 9.0], "flash": [1.3, 1.1]}) == "mlx"
    # three candidates: the fastest, if clear of the baseline
    assert kc.decide({"mlx": [1.0], "exp": [0.8], "exp-wide": [0.7]}) == "exp-wide"
    assert kc.decide({"mlx": [1.0], "exp": [0.8]}, margin=0.25) == "mlx"
    # candidates in order of preference: exp-wide (twice the memory) must beat exp clearly too
    assert kc.decide({"mlx": [1.0], "exp": [0.8], "exp-wide": [0.78]}) == "exp"
    assert kc.decide({"mlx": [1.0], "exp": [0.97], "exp-wide": [0.9]}) == "exp-wide"


@pytest.mark.parametrize("seed", range(20))
def test_decision_is_never_more_than_the_margin_slower_than_the_best(seed):
    import random

    rng = random.Random(seed)
    times = {k: [rng.uniform(0.5, 2.0) for _ in range(3)] for k in ("mlx", "a", "b")}
    chosen = kc.decide(times)
    best = min(min(v) for v in times.values())
    assert min(times[chosen]) <= best / (1 - kc.MARGIN)


def test_decide_rejects_missing_baseline():
    with pytest.raises(ValueError):
        kc.decide({"mlx": [], "flash": [1.0]})


def test_measure_alternates_and_takes_every_round():
    order, now = [], [0.0]
    cost = {"mlx": 2.0, "flash": 1.0}

    def fn(name):
        def run():
            order.append(name)
            now[0] += cost[name]

        return run

    times = kc.measure({"mlx": fn("mlx"), "flash": fn("flash")}, rounds=4, clock=lambda: now[0])
    assert times == {"mlx": [2.0] * 4, "flash": [1.0] * 4}
    # one warm-up each, then the order flips every round so drift hits both alike
    assert order[:2] == ["mlx", "flash"]
    assert order[2:] == ["mlx", "flash", "flash", "mlx", "mlx", "flash", "flash", "mlx"]


def test_measure_stops_at_the_budget_with_two_rounds_each():
    now = [0.0]

    def slow():
        now[0] += 100.0

    times = kc.measure({"mlx": slow, "flash": slow}, rounds=5, budget_s=1.0, clock=lambda: now[0])
    assert [len(v) for v in times.values()] == [2, 2]


def test_override_parsing():
    assert kc.parse_override("") == {}
    assert kc.parse_override("attention=off, swiglu=on") == {"attention": "mlx", "swiglu": "fused"}
    assert kc.parse_override("all=off") == {k: "mlx" for k in kc.KERNELS}
    on = {"attention": "flash", "swiglu": "fused", "lora": "fused"}
    assert kc.parse_override("all=on;head=auto") == on
    assert kc.parse_override("head=exp-wide") == {"head": "exp-wide"}
    for bad in ("attention", "softmax=on", "head=flash"):
        with pytest.raises(ValueError, match=kc.ENV):
            kc.parse_override(bad)


def test_bad_env_is_a_config_error(monkeypatch):
    monkeypatch.setenv(kc.ENV, "attn=off")
    kc.reset()
    try:
        with pytest.raises(ConfigError, match="attn=off"):
            kc.chooser()
    finally:
        kc.reset()


def test_shape_classes_bucket_lengths_and_rows_only():
    a = kc.shape_class("attention", B=4, H=8, K=2, T=200, D=32)
    assert a == kc.shape_class("attention", D=32, T=256, K=2, H=8, B=4)
    assert a == kc.shape_class("attention", D=32, T=256, K=2, H=8, B=3)
    assert a != kc.shape_class("attention", B=4, H=8, K=2, T=257, D=32)
    assert a != kc.shape_class("attention", B=2, H=8, K=2, T=200, D=32)
    assert a != kc.shape_class("attention", B=5, H=8, K=2, T=200, D=32)
    assert a != kc.shape_class("attention", B=4, H=4, K=2, T=200, D=32)
    assert [kc.bucket(n) for n in (1, 64, 65, 1000, 1024, 1025)] == [64, 64, 128, 1024, 1024, 2048]


def _fake_measure(times):
    calls = []

    def measure(fns):
        calls.append(sorted(fns))
        return times

    return measure, calls


def test_chooser_measures_once_then_reads_the_cache(tmp_path):
    path, lines = tmp_path / "k.json", []
    measure, calls = _fake_measure({"mlx": [0.010, 0.011], "flash": [0.005]})
    c = kc.Chooser(path, report=lines.append, measure_fn=measure)
    bench = lambda: {"mlx": None, "flash": None}  # noqa: E731
    assert c.choose("attention", "attention T256", bench) == "flash"
    assert c.choose("attention", "attention T256", bench) == "flash"
    assert len(calls) == 1 and len(lines) == 1  # measured and printed once
    assert "flash" in lines[0] and "mlx 10.00 ms" in lines[0]
    assert json.loads(path.read_text())["attention T256"]["choice"] == "flash"
    # a new process (a new Chooser) reads the cache: no timing
    measure2, calls2 = _fake_measure({"mlx": [1.0], "flash": [9.0]})
    c2 = kc.Chooser(path, report=lines.append, measure_fn=measure2)
    assert c2.choose("attention", "attention T256", bench) == "flash"
    assert calls2 == [] and c2.decisions["attention T256"].source == "cache"
    # another shape class is measured on its own
    assert c2.choose("attention", "attention T512", bench) == "mlx"
    assert len(calls2) == 1
    assert {d.shape for d in c2.cached()} == {"attention T256", "attention T512"}


def test_override_wins_without_timing(tmp_path):
    measure, calls = _fake_measure({"mlx": [1.0], "flash": [0.1]})
    lines = []
    c = kc.Chooser(tmp_path / "k.json", {"attention": "mlx"}, lines.append, measure)
    assert c.choose("attention", "attention T256", lambda: {}) == "mlx"
    assert c.choose("attention", "attention T512", lambda: {}) == "mlx"
    assert calls == [] and len(lines) == 1 and "override" in lines[0]


def test_damaged_or_unwritable_cache_measures_again(tmp_path):
    path = tmp_path / "k.json"
    path.write_text("{not json")
    measure, calls = _fake_measure({"mlx": [1.0], "fused": [2.0]})
    c = kc.Chooser(path, report=lambda _: None, measure_fn=measure)
    assert c.choose("swiglu", "swiglu N1024", lambda: {}) == "mlx"
    assert len(calls) == 1
    blocked = tmp_path / "file"
    blocked.write_text("")
    c = kc.Chooser(blocked / "k.json", report=lambda _: None, measure_fn=measure)
    assert c.choose("swiglu", "swiglu N1024", lambda: {}) == "mlx"  # no write, no error


def test_cache_file_changes_with_the_candidates_and_the_timing(monkeypatch, tmp_path):
    """A decision taken among other candidates, or timed another way, is not read again: the
    cache file is keyed by both (as by the machine and MLX)."""
    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path))
    before = kc.default_cache_path()
    assert before == kc.default_cache_path()  # stable for the same settings
    fewer = {**kc.CANDIDATES, "head": ("mlx", "exp", "exp-wide")}
    monkeypatch.setattr(kc, "CANDIDATES", fewer)
    assert kc.default_cache_path() != before
    monkeypatch.undo()
    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path))
    monkeypatch.setattr(kc, "TIMING_VERSION", kc.TIMING_VERSION - 1)
    assert kc.default_cache_path() != before
