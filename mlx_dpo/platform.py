"""The machine the run is on: OS, CPU architecture, MLX backend and memory, read in one place.

`detect()` is the only function that asks the system and MLX, and `cpu_model()` the only one
that reads which CPU this is; everything that depends on the platform (the compute path, the
CPU kernels, the memory budget, the wired-memory limit, the doctor's lines, the reference cache
key) takes a `Platform` argument and calls `detect()` only when none is given. Tests build the
four platforms with `Platform.make` and run every branch on any machine: the x86 CPU build
(`mlx[cpu]` on Linux), the arm CPU backend, Metal (Apple silicon, unified memory) and CUDA
(`mlx[cuda]`); `forced(plat)` makes `detect()` return `plat` for a whole command
(tests/test_gpu_path.py trains down the Metal path on a Linux CPU this way).
"""

from __future__ import annotations

import os
import platform as _platform
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx

KINDS = ("x86-cpu", "arm-cpu", "metal", "cuda")


@dataclass(frozen=True)
class Platform:
    """What MLX computes on. `backend` is where the default device's arrays live."""

    os: str  # platform.system(): "Linux", "Darwin", ...
    arch: str  # "x86_64" or "arm64"/"aarch64"
    backend: str  # "cpu", "metal" or "cuda"
    memory_bytes: int  # RAM, or the unified memory Metal shares with the CPU; 0 when unknown
    device_info: dict = field(default_factory=dict, compare=False)  # mx.device_info() as read

    @property
    def kind(self) -> str:
        """One of KINDS: what the compute path and the kernels depend on."""
        if self.backend != "cpu":
            return self.backend
        return "x86-cpu" if self.arch.lower() in ("x86_64", "amd64") else "arm-cpu"

    @property
    def gpu(self) -> bool:
        return self.backend in ("metal", "cuda")

    @classmethod
    def make(cls, kind: str, memory_bytes: int = 16 << 30, **info) -> Platform:
        """A platform of `kind` with plausible device_info keys (for tests and what-if plans).
        `info` adds or overrides device_info keys."""
        if kind not in KINDS:
            raise ValueError(f"platform kind must be one of {KINDS}, got {kind!r}")
        os_name, arch = {
            "x86-cpu": ("Linux", "x86_64"),
            "arm-cpu": ("Linux", "aarch64"),
            "metal": ("Darwin", "arm64"),
            "cuda": ("Linux", "x86_64"),
        }[kind]
        device_info = {
            "metal": {
                "device_name": "Apple M-series",
                "architecture": "applegpu",
                "memory_size": memory_bytes,
                "max_recommended_working_set_size": int(0.75 * memory_bytes),
                "max_buffer_length": memory_bytes // 2,
            },
            "cuda": {"device_name": "NVIDIA GPU", "total_memory": memory_bytes},
        }.get(kind, {})
        backend = kind if kind in ("metal", "cuda") else "cpu"
        return cls(os_name, arch, backend, memory_bytes, {**device_info, **info})


# The instruction sets a kernel's speed depends on: two CPUs that differ in these are not the
# same machine to a timing, even where both call themselves "AMD EPYC" (as cloud VMs do).
_FEATURES = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "asimd",
             "sve", "sve2", "i8mm", "bf16")  # fmt: skip
_IDENTITY = ("vendor_id", "cpu family", "model", "stepping", "CPU implementer", "CPU part")


def cpu_model(cpuinfo: str | None = None, system: str | None = None) -> str:
    """This CPU as a timing needs to tell it apart: its name, and on Linux its family, model and
    stepping (or arm's implementer and part) and the vector instructions it has, from
    /proc/cpuinfo (`cpuinfo`: that file's text, for tests); the brand string on macOS
    ("Apple M3 Max"). The name alone is not enough: a cloud VM's may be "AMD EPYC" for a Zen 3
    without AVX-512 one day and a Zen 5 with it the next."""
    system = system or _platform.system()
    if system == "Darwin":
        try:
            cmd = ["sysctl", "-n", "machdep.cpu.brand_string"]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            return run.stdout.strip() or _platform.processor()
        except (OSError, subprocess.SubprocessError):
            return _platform.processor()
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 16)  # the first core's lines are enough
        except OSError:
            return _platform.processor()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or _platform.processor() or "unknown CPU"
    have = set((fields.get("flags") or fields.get("Features") or "").split())
    ident = [f"{k} {fields[k]}" for k in _IDENTITY if fields.get(k)]
    features = [f for f in _FEATURES if f in have]
    return f"{name} ({', '.join(ident)}; {' '.join(features) or 'no vector extensions listed'})"


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _device_info() -> dict:
    # mx.device_info() is recent, and its keys differ per backend: never assume one.
    try:
        return dict(mx.device_info())
    except (AttributeError, RuntimeError, TypeError):
        return {}


_FORCED: list[Platform] = []


@contextmanager
def forced(plat: Platform) -> Iterator[Platform]:
    """`detect()` returns `plat` inside this block: for tests that run a whole training command
    down another platform's path (the arrays still live on this machine's device)."""
    _FORCED.append(plat)
    try:
        yield plat
    finally:
        _FORCED.pop()


def detect() -> Platform:
    """The platform this process computes on (MLX's default device)."""
    if _FORCED:
        return _FORCED[-1]
    if mx.default_device() == mx.cpu:
        backend = "cpu"
    elif mx.metal.is_available():
        backend = "metal"
    elif hasattr(mx, "cuda") and mx.cuda.is_available():
        backend = "cuda"
    else:
        backend = "cpu"
    info = _device_info()
    memory = int(info.get("memory_size", 0)) if backend == "metal" else _ram_bytes()
    return Platform(_platform.system(), _platform.machine(), backend, memory, info)


def set_wired_limit(plat: Platform, setter: Callable[[int], int] | None = None) -> str | None:
    """On Metal, let MLX keep up to the recommended working set wired (resident, never paged
    out), as mlx-lm's trainer does; without it macOS may page the weights out between steps.
    Elsewhere, or when the device does not report the key, nothing is done. Returns a note."""
    limit = plat.device_info.get("max_recommended_working_set_size")
    if plat.backend != "metal" or not limit:
        return None
    setter = setter or getattr(mx, "set_wired_limit", None)
    if setter is None:  # an MLX without it: nothing to set
        return None
    setter(int(limit))
    return f"wired memory limit {int(limit) / 2**30:.1f} GiB (Metal's recommended working set)"
