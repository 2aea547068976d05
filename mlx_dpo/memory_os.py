"""Memory as the machine and the operating system see it, around the planner's MLX arrays:
`available_bytes` (what MLX may use on a platform) and `resident` (a plan's parts the OS sees
besides the arrays: the runtime, the allocator's cache and slack, measured in this process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from mlx_dpo.platform import Platform, detect

if TYPE_CHECKING:
    from mlx_dpo.memory import MemoryPlan

RUNTIME_OVERHEAD = 512 << 20  # Python, MLX, mlx-lm, tokenizer: resident but not in the plan
# RSS above (runtime + MLX's peak): a fraction of the step's arrays above the weights, plus,
# with the flash attention, a multiple of one block's score tiles (each query block's tile has
# its own size, and MLX's buffer cache reuses a freed buffer only for a request of about its
# size; the next block's tiles reuse them). Fitted at 13 grid points (5M-135M, 128-1024 tokens,
# 1-8 pairs, fp32 and 4-bit), where RSS - runtime - MLX's peak was 18 MB to 2.4 GB: within 7%
# of the RSS at each (benchmarks/RESULTS.md section 4b). The tiles' multiple refitted (7.5 ->
# 5.5) at the grid points of section 1l, run with the kernels of then, and to 5.0 in 1m: it was
# 2.9-3.2x at Qwen2.5-0.5B x 1,024 x 2 and x 8 (where the plan needs <= 5.4 to stay within 15%
# of the RSS), 6.1x at 40M x 1,024 x 8 (which needs >= 4.4); 5.0 is the middle.
ALLOCATOR_SLACK = 0.13
TILE_SLACK = 5.0
OS_NOTES = {
    "runtime": "Python, MLX, mlx-lm, the BLAS: resident memory that is not an MLX array",
    "allocator cache": "freed MLX buffers kept for reuse (e.g. fp32 weights replaced by 4-bit "
    "ones at load)",
    "allocator slack": "buffers the allocator cannot reuse at the peak: "
    f"{ALLOCATOR_SLACK:.0%} of the step's arrays, {TILE_SLACK}x a block's flash attention tiles",
}


def resident(
    plan: MemoryPlan, rss_bytes: int | None = None, runtime: int | None = None
) -> MemoryPlan:
    """`plan` with what the OS will see besides the step's arrays, measured in this process
    now (call it after the model is loaded): the runtime's resident memory (RSS less MLX's
    arrays and cache, or `runtime` as measured earlier by `runtime_bytes`), the allocator's
    cached buffers, and a slack for buffers the allocator cannot reuse at the peak."""
    rss = _rss_bytes() if rss_bytes is None else rss_bytes
    cached = mx.get_cache_memory()
    plan.os_parts = {
        "runtime": runtime_bytes(rss) if runtime is None else runtime,
        "allocator cache": cached,
        "allocator slack": allocator_slack(plan),
    }
    plan.peak_so_far = max(_peak_rss_bytes(), rss) if rss_bytes is None else rss
    return plan


def runtime_bytes(rss_bytes: int | None = None) -> int:
    """What the process holds resident beyond MLX's arrays and cached buffers (the weights are
    in the plan already): Python, MLX, the BLAS, and heap memory freed but not returned to the
    OS. Measure it before timing kernels: the buffers their timing frees stay in the heap,
    resident, and the step's own arrays reuse them (counted twice, they put the plan of a
    135M model at 512 tokens 18% above the peak RSS)."""
    rss = _rss_bytes() if rss_bytes is None else rss_bytes
    return max(rss - mx.get_active_memory() - mx.get_cache_memory(), 0)


def allocator_slack(plan: MemoryPlan) -> int:
    above_weights = plan.total_bytes - plan.parts["weights"]
    return int(ALLOCATOR_SLACK * above_weights + TILE_SLACK * plan.attention_tiles)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    """The process's peak resident set so far (what `ru_maxrss` will report at the end)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes


def available_bytes(plat: Platform | None = None) -> tuple[int, str]:
    """(bytes MLX may use, where the number comes from) on `plat` (default: this machine).

    Metal: the recommended working set (~75% of unified memory; more gets paged out or fails);
    CUDA: the GPU's total memory when the device reports it; a CPU: the machine's RAM. Keys of
    `mx.device_info()` differ per backend, so each is read only where it exists."""
    plat = plat or detect()
    info = plat.device_info
    if plat.backend == "metal" and info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    if plat.backend == "cuda" and info.get("total_memory"):
        return int(info["total_memory"]), "the CUDA device's memory"
    if plat.memory_bytes > 0:
        return plat.memory_bytes, "unified memory" if plat.backend == "metal" else "total RAM"
    return 0, "unknown"
