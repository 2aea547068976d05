"""Which of mlx_dpo.cpu_kernels to use, decided by timing each against MLX's own op.

A kernel that is 5x faster on one shape can be slower on another (many small query blocks,
short rows, a small vocabulary: per-op dispatch then outweighs the exp it saves), so nothing
here is assumed. The first time a kernel meets a shape class (its real shapes, bucketed: see
`shape_class`), the candidates run alternately a few times on random inputs of those shapes,
forward and backward, and the fastest best time wins, but a fast kernel replaces MLX's op only
when it is at least MARGIN faster: on this noisy a machine a closer call is not a measurement,
and keeping MLX's op then costs at most MARGIN. The decision is printed once and cached in
`<cache dir>/kernels-<key>.json`, keyed by the machine (CPU model and vector instructions,
cores), the MLX version and the shape class, which holds the model's dimensions; the cache dir
is MLX_DPO_CACHE (default ~/.cache/mlx_dpo).

Overrides (MLX_DPO_KERNELS, e.g. `attention=off,swiglu=on`; `all=off`; `auto` is the default)
skip the timing; MLX_DPO_NO_FAST_EXP=1 turns every kernel off.

Kernels and their candidates (the first is MLX's own, the baseline):
  attention  - "mlx": mlx-lm's scaled_dot_product_attention; "flash", "flash-32", "flash-16":
               cpu_kernels' blocked one, 64, 32 or 16 queries a block (smaller blocks hold less
               and suit long rows and big batches, but run more ops: each must beat the larger
               one by MARGIN)
  swiglu     - "mlx": silu(gate) * x in MLX ops; "fused": cpu_kernels.swiglu
  head       - the lean head's vocabulary tiles: "mlx" (mx.exp, 8192-wide tiles), "exp"
               (the fast exp, 2048-wide tiles), "exp-wide" (the fast exp, 8192-wide tiles:
               twice the memory of "exp", so it must beat "exp" by MARGIN too), "exp-kept"
               ("exp" whose backward reuses the forward's logits instead of recomputing them:
               one matmul of three less, the scored tokens' N x V logits held; last, and
               only where they fit in logps.KEEP_LOGITS_MAX_BYTES)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ENV = "MLX_DPO_KERNELS"
MARGIN = 0.05  # a fast kernel must beat the baseline's best time by this fraction
# ... except where timing it alone understates what it saves in the step: the fused LoRA runs
# the same GEMMs as mlx-lm's adapter with fewer passes over memory, 3-4% faster alone on
# SmolLM2-135M's MLP projections at 382 tokens, where the whole step gained 5% (RESULTS.md 1k)
MARGINS = {"lora": 0.02}
ROUNDS = 5  # timed rounds per candidate (after one warm-up), candidates alternating
BUDGET_S = 20.0  # stop timing after this long (a huge shape); at least 2 rounds each
CANDIDATES = {
    "attention": ("mlx", "flash", "flash-32", "flash-16"),
    "swiglu": ("mlx", "fused"),
    "head": ("mlx", "exp", "exp-wide", "exp-kept"),
    "lora": ("mlx", "fused"),
}
KERNELS = tuple(CANDIDATES)
# what "on" means in an override: the fast candidate to use without timing
ON = {"attention": "flash", "swiglu": "fused", "head": "exp", "lora": "fused"}


@dataclass(frozen=True)
class Decision:
    kernel: str
    shape: str  # the shape class
    choice: str  # one of CANDIDATES[kernel]
    source: str  # "measured", "cache", "override"
    best_ms: dict  # candidate -> best time in ms (empty for an override)

    def line(self) -> str:
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in self.best_ms.items())
        why = f"{self.source}: {times}" if times else self.source
        return f"kernel {self.kernel} [{self.shape}] -> {self.choice} ({why})"


def decide(times: dict[str, list[float]], margin: float = MARGIN) -> str:
    """The candidate to use given each one's timings (seconds), the candidates in order of
    preference (the first, MLX's own, is the baseline; then the ones holding less memory: the
    head's `exp` before `exp-wide`, whose tiles hold twice as much): a later candidate takes
    over only when its best time beats the current choice's by more than `margin`. The choice
    is never more than `margin` slower than the fastest."""
    names = list(times)
    if not names:
        raise ValueError("no candidates")
    best = {k: min(v) for k, v in times.items() if v}
    if names[0] not in best:
        raise ValueError(f"no timing for the baseline {names[0]!r}")
    choice = names[0]
    for name in names[1:]:
        if name in best and best[name] < (1.0 - margin) * best[choice]:
            choice = name
    return choice


def measure(
    fns: dict[str, Callable[[], object]],
    rounds: int = ROUNDS,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time each `fns[name]()` (which must block until done) `rounds` times, the candidates
    alternating so that a burst of load elsewhere hits all alike; one warm-up call each first
    (it compiles). Stops early past `budget_s` once every candidate has 2 timings."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = clock()
    for r in range(rounds):
        for name in list(fns)[:: 1 if r % 2 == 0 else -1]:  # alternate the order too
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
        if r >= 1 and clock() - start > budget_s:
            break
    return times


def parse_override(text: str | None) -> dict[str, str]:
    """`attention=off,swiglu=on,head=exp-wide` -> {kernel: candidate}; `auto` entries are
    dropped; `all=...` sets every kernel. Raises ValueError naming a bad entry."""
    out: dict[str, str] = {}
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or (name not in CANDIDATES and name != "all"):
            raise ValueError(
                f"{ENV}: {item!r} is not KERNEL=VALUE with KERNEL one of {', '.join(KERNELS)}, all"
            )
        for k in KERNELS if name == "all" else [name]:
            choice = {"off": CANDIDATES[k][0], "on": ON[k]}.get(value, value)
            if value == "auto":
                out.pop(k, None)
            elif choice not in CANDIDATES[k]:
                raise ValueError(
                    f"{ENV}: {k}={value!r}: use on, off, auto or one of {', '.join(CANDIDATES[k])}"
                )
            else:
                out[k] = choice
    return out


def bucket(n: int, smallest: int = 64) -> int:
    """Sizes by power of two (>= `smallest`): one measurement covers a class."""
    b = smallest
    while b < n:
        b *= 2
    return b


def shape_class(kernel: str, **dims: int) -> str:
    """A stable text key of a kernel's shapes: a `T` (sequence length) or `N` (tokens) dim is
    bucketed by powers of two from 64, a `B` (rows) dim from 1 (the reference pass's batches
    hold as many rows as fit a token budget: one timing per row count would be dozens), the
    others kept exact (they are the model's)."""
    smallest = {"T": 64, "N": 64, "B": 1}
    parts = [
        f"{k}{bucket(v, smallest[k]) if k in smallest else v}" for k, v in sorted(dims.items())
    ]
    return f"{kernel} " + " ".join(parts)


# Bumped when the way candidates are timed changes, so that no decision taken the old way is
# read again (3: every candidate's forward value evaluated, and the SwiGLU's MLP block adapted
# through the call the step takes; 2: the head's timing slice evaluated before timing; 1 timed
# its random draws too).
TIMING_VERSION = 3


def machine_key() -> str:
    """The CPU (`platform.cpu_model`: name, family, vector instructions), core count, OS/arch,
    the MLX version and the BLAS thread settings: what a timing holds for (with one BLAS thread
    the matmuls around a kernel take longer); and the candidates and TIMING_VERSION: a decision
    among other candidates, or timed another way, is not one to reuse."""
    import mlx.core as mx

    from mlx_dpo.platform import cpu_model

    parts = [cpu_model(), str(os.cpu_count()), platform.system(), platform.machine()]
    parts.append(mx.__version__)
    threads = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    parts += [f"{k}={os.environ[k]}" for k in threads if os.environ.get(k)]
    parts += [f"timing v{TIMING_VERSION}", repr(sorted(CANDIDATES.items()))]
    return "|".join(parts)


def default_cache_path() -> Path:
    root = os.environ.get("MLX_DPO_CACHE") or Path.home() / ".cache" / "mlx_dpo"
    digest = hashlib.sha256(machine_key().encode()).hexdigest()[:16]
    return Path(root) / f"kernels-{digest}.json"


class Chooser:
    """Decisions for this process: the override, then this process's memory, then the cache
    file, then a measurement (`bench()` -> {candidate: zero-argument blocking callable})."""

    def __init__(
        self,
        cache_path: Path | None = None,
        override: dict[str, str] | None = None,
        report: Callable[[str], None] | None = None,
        measure_fn: Callable[[dict], dict[str, list[float]]] = measure,
    ):
        self.cache_path = cache_path
        self.override = dict(override or {})
        self.report = report if report is not None else _stderr
        self.measure_fn = measure_fn
        self.decisions: dict[str, Decision] = {}

    def choose(self, kernel: str, shape: str, bench: Callable[[], dict]) -> str:
        if kernel in self.override:
            key = f"override {kernel}"
            if key not in self.decisions:
                self._record(
                    key, Decision(kernel, "all shapes", self.override[kernel], "override", {})
                )
            return self.override[kernel]
        if shape in self.decisions:
            return self.decisions[shape].choice
        cached = self._read().get(shape)
        if cached and cached.get("choice") in CANDIDATES[kernel]:
            d = Decision(kernel, shape, cached["choice"], "cache", cached.get("best_ms", {}))
        else:
            times = self.measure_fn(bench())
            _release()
            best_ms = {k: min(v) * 1e3 for k, v in times.items() if v}
            d = Decision(
                kernel, shape, decide(times, MARGINS.get(kernel, MARGIN)), "measured", best_ms
            )
            self._write(shape, d)
        self._record(shape, d)
        return d.choice

    def _record(self, key: str, d: Decision) -> None:
        self.decisions[key] = d
        self.report(d.line())

    def _read(self) -> dict:
        if self.cache_path is None:
            return {}
        try:
            return json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or damaged: measure again

    def _write(self, shape: str, d: Decision) -> None:
        if self.cache_path is None:
            return
        entries = self._read()
        entries[shape] = {"choice": d.choice, "best_ms": d.best_ms}
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            os.replace(tmp, self.cache_path)
        except OSError:
            pass  # a read-only cache dir: decide again next run

    def cached(self) -> list[Decision]:
        """Every decision in the cache file (for `mlx_dpo doctor`)."""
        out = []
        for shape, e in sorted(self._read().items()):
            kernel = shape.split(" ", 1)[0]
            out.append(Decision(kernel, shape, e.get("choice", "?"), "cache", e.get("best_ms", {})))
        return out

    def as_dict(self) -> list[dict]:
        return [asdict(d) for d in self.decisions.values()]


def _release() -> None:
    """Hand the timing's freed buffers back to the OS: left in MLX's cache they would not fit
    the step's sizes and would only add to the process's resident memory."""
    import mlx.core as mx

    mx.clear_cache()


def _stderr(line: str) -> None:
    print(f"mlx_dpo: {line}", file=sys.stderr, flush=True)


_CHOOSER: list[Chooser] = []


def chooser() -> Chooser:
    """The process's Chooser (the cache file of this machine, MLX_DPO_KERNELS read once).
    A malformed MLX_DPO_KERNELS is the user's mistake: a ConfigError."""
    if not _CHOOSER:
        from mlx_dpo.config import ConfigError

        try:
            override = parse_override(os.environ.get(ENV))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _CHOOSER.append(Chooser(default_cache_path(), override))
    return _CHOOSER[0]


def summary() -> str:
    """One line for `mlx_dpo doctor` and the run log: the override and the cached decisions."""
    c = chooser()
    parts = [f"{k}={v} ({ENV})" for k, v in sorted(c.override.items())]
    counts: dict[str, dict[str, int]] = {}
    entries = {d.shape: d for d in c.cached()}
    entries.update({d.shape: d for d in c.decisions.values() if d.source != "override"})
    for d in entries.values():
        if d.kernel not in c.override:
            counts.setdefault(d.kernel, {}).setdefault(d.choice, 0)
            counts[d.kernel][d.choice] += 1
    for kernel, by in sorted(counts.items()):
        parts.append(
            f"{kernel}: " + ", ".join(f"{ch} on {n} shape class(es)" for ch, n in by.items())
        )
    measured = "timed per shape class on first use" if len(c.override) < len(KERNELS) else ""
    cache = f"cache {c.cache_path}" if c.cache_path else "no cache"
    return "; ".join([p for p in [measured] if p] + parts + [cache])


@contextmanager
def pinned(choices: dict[str, str]) -> Iterator[None]:
    """Inside, the kernels run `choices` without timing, reporting or caching anything (a
    probe on toy shapes, such as shared_prompt.check, must not decide the run's kernels)."""
    saved = list(_CHOOSER)
    _CHOOSER[:] = [Chooser(None, choices, report=lambda line: None)]
    try:
        yield
    finally:
        _CHOOSER[:] = saved


def reset(new: Chooser | None = None) -> None:
    """Forget this process's decisions (tests; or after changing MLX_DPO_KERNELS)."""
    _CHOOSER.clear()
    if new is not None:
        _CHOOSER.append(new)
