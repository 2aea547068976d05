"""Reference log-probs: computed once, before training, with the adapters off, and cached.

The reference policy is the base model (plus an `--init-adapter`, when given) at step 0, so
its per-pair summed completion log-probs never change during training: one no-grad pass
replaces two reference forwards per step and no second model is held. The cache file is keyed
by the model's content (`fingerprint_dir`), the compute path and the exact token ids of every
pair, so the next run on the same model and data reuses it, and any change in tokenization or
weights misses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_dpo import shared_prompt
from mlx_dpo.data import collate, pair_lengths, rank_share
from mlx_dpo.progress import Progress
from mlx_dpo.trainer import compiled_logps

CACHE_VERSION = 2  # 2: content-keyed model identity
# Rows of a forward-only pass hold no activations for a backward, so short pairs go in bigger
# batches: at least this many tokens per half-batch (chosen or rejected rows). The demo's 32-token
# rows then run 64 pairs per forward instead of 8; long rows keep the training batch size.
MIN_BATCH_TOKENS = 2048
PAD_TO = 32  # as training: each new padded (rows, length) shape traces the compiled forward


def cache_dir() -> Path:
    root = os.environ.get("MLX_DPO_CACHE") or Path.home() / ".cache" / "mlx_dpo"
    return Path(root) / "reference"


WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 1 << 20


def fingerprint_file(path: Path) -> str:
    """Content hash of one file. Small files: all of it. Big weight files: their size, the
    safetensors header (every tensor's name, dtype, shape and offset) and 1 MiB from the
    start, middle and end of the data, so a model of GBs is keyed in milliseconds."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            h.update(f.read())
            return h.hexdigest()
        header = int.from_bytes(f.read(8), "little") if path.suffix == ".safetensors" else 0
        f.seek(0)
        h.update(f.read(8 + header if 8 + header < size else 0))
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def fingerprint_dir(path: Path) -> dict:
    """Content identity of a model/adapter directory: a Hub snapshot's commit, else the hashes
    of its weight and config files (`fingerprint_file`). Not paths or modification times:
    reinstalling, copying or touching the files keeps the reference cache valid."""
    path = Path(path).resolve()
    if path.parent.name == "snapshots":
        return {"hub_commit": path.name, "repo": path.parent.parent.name}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return {"files": {p.name: fingerprint_file(p) for p in files if p.is_file()}}


def pairs_digest(pairs, h=None) -> str:
    """Content hash of tokenized pairs (their token ids, in order)."""
    h = h or hashlib.sha256()
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()[:32]


def cache_key(model_identity: dict, pairs) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "model": model_identity}, sort_keys=True).encode())
    return pairs_digest(pairs, h)


def length_batches(pairs, batch_size: int) -> list[np.ndarray]:
    """Pair indices in length order, cut so that every batch holds about as many tokens as
    `batch_size` pairs of the longest row (and at least MIN_BATCH_TOKENS per half)."""
    lengths = pair_lengths(pairs)
    padded = -(-lengths // PAD_TO) * PAD_TO
    budget = max(batch_size * int(padded.max()), MIN_BATCH_TOKENS)
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        end = start + 1  # sorted ascending: the last pair of a batch sets its padded length
        while end < len(order) and (end + 1 - start) * padded[order[end]] <= budget:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def pair_logps(
    model,
    pairs,
    *,
    batch_size: int,
    group=None,
    ld_alpha: float | None = None,
    label: str = "reference pass",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-probs of every pair under `model` (no gradient), float32 (LD-DPO's
    sums with `ld_alpha`).
    Distributed: each global batch (`batch_size` per rank) is shared as training shares one
    (`data.rank_share`), and the ranks' values are summed together.
    Shows a progress bar (or periodic lines) on the main process."""
    world, rank = (group.size(), group.rank()) if group else (1, 0)
    chosen = np.zeros(len(pairs), np.float32)
    rejected = np.zeros(len(pairs), np.float32)
    forward = compiled_logps(model, ld_alpha)
    shared = shared_prompt.active(model)
    with Progress(label, len(pairs), unit="pairs", enabled=rank == 0) as progress:
        for global_index in length_batches(pairs, batch_size * world):
            index = rank_share(global_index, rank, world)
            if len(index):
                batch = collate(
                    [pairs[j] for j in index], index=index, pad_to=PAD_TO, share_prompt=shared
                )
                logps = np.array(forward(batch))
                chosen[index] = logps[: len(index)]
                rejected[index] = logps[len(index) :]
            progress.update(len(global_index))  # the other ranks keep pace with this one
    if world > 1:
        both = mx.distributed.all_sum(mx.array(np.stack([chosen, rejected])), group=group)
        chosen, rejected = np.array(both[0]), np.array(both[1])
    return chosen, rejected


def cached_compute(
    model, pairs, model_identity: dict, *, batch_size: int, use_cache=True, group=None, log=print
):
    """`pair_logps` of the reference model, through the on-disk cache. Returns (chosen,
    rejected, cache hit?)."""
    if not pairs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32), False
    path = cache_dir() / f"{cache_key(model_identity, pairs)}.npz"
    cached = _read_cache(path, len(pairs), log) if use_cache else None
    if group is not None and group.size() > 1:
        # all ranks must agree, or some would wait forever in pair_logps' all_sum
        hits = mx.distributed.all_sum(mx.array(int(cached is not None)), group=group).item()
        cached = cached if hits == group.size() else None
    if cached is not None:
        return cached[0], cached[1], True
    # LD-DPO's reference sums differ from the plain ones; the identity (cache key) holds alpha
    ld_alpha = model_identity.get("ld_alpha")
    chosen, rejected = pair_logps(
        model, pairs, batch_size=batch_size, group=group, ld_alpha=ld_alpha
    )
    is_main = group is None or group.rank() == 0
    if use_cache and is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, chosen=chosen, rejected=rejected)
        os.replace(tmp, path)
    return chosen, rejected, False


def _read_cache(path: Path, n: int, log) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            chosen, rejected = f["chosen"], f["rejected"]
        if len(chosen) == len(rejected) == n:
            return chosen, rejected
        raise ValueError(f"{len(chosen)} pairs, expected {n}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log(f"warning: the reference cache file {path} is unreadable ({e}); recomputing it")
    return None


def model_identity(cfg, loaded, plat=None) -> dict:
    """What the reference log-probs depend on besides the token ids: the cache key's model part."""
    from mlx_dpo import cpu_kernels
    from mlx_dpo import model as model_lib
    from mlx_dpo.platform import detect

    plat = plat or detect()
    ident = {
        "model": fingerprint_dir(loaded.path),
        "quantize": cfg.quantize,
        "q_group_size": cfg.q_group_size if cfg.quantize else None,
        "compute_dtype": cfg.compute_dtype,
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "cpu_kernels": cpu_kernels.enabled(plat),  # a different exp: round-off-level differences
        "platform": plat.kind,  # Metal and CUDA are both "gpu" devices; their kernels differ
    }
    if cfg.ld_alpha is not None:  # LD-DPO's reference sums are other numbers
        ident["ld_alpha"] = cfg.ld_alpha
    if cfg.init_adapter:
        ident["init_adapter"] = fingerprint_dir(Path(cfg.init_adapter))
    if cfg.ref_model:
        ident["ref_model"] = fingerprint_dir(model_lib.resolve_path(cfg.ref_model))
    return ident


def for_run(cfg, loaded, splits: dict[str, list], *, group=None, log=print) -> dict:
    """The run's reference log-probs, {split: (chosen, rejected)}, for training and evaluation
    alike: the base model with adapters off as loaded (an --init-adapter included), or the
    separate --ref-model, which is loaded, checked, used and freed here."""
    import gc

    from mlx_dpo import _testhooks
    from mlx_dpo import model as model_lib
    from mlx_dpo.errors import ModelError

    identity = model_identity(cfg, loaded)
    model = loaded.model
    if cfg.ref_model:
        model = model_lib.load(cfg.ref_model, compute_dtype=cfg.compute_dtype).model
        theirs, ours = (getattr(m, "args", None) for m in (model, loaded.model))
        if theirs and ours and theirs.vocab_size != ours.vocab_size:
            raise ModelError(
                f"--ref-model {cfg.ref_model}: its vocabulary ({theirs.vocab_size}) differs from "
                f"--model's ({ours.vocab_size}); the reference must share the tokenizer"
            )
    _testhooks.point("reference-pass")
    refs = {}
    for name, pairs in splits.items():
        chosen, rejected, hit = cached_compute(
            model,
            pairs,
            identity,
            batch_size=2 * cfg.batch_size,
            use_cache=cfg.reference_cache,
            group=group,
            log=log,
        )
        if pairs:
            log(f"reference log-probs ({name}): {'reused from cache' if hit else 'computed'}")
        refs[name] = (chosen, rejected)
    del model
    gc.collect()
    return refs
