"""Shared fixtures. Torch and an RTLD_GLOBAL OpenBLAS (or MKL) in one process oversubscribe the two
cores (torch 3x slower), so BLAS threads are pinned to 1 before anything imports them."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")  # the same for the mkl wheel
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# reference log-prob caches of test runs stay out of the user's ~/.cache, and go when it ends
if "MLX_DPO_CACHE" not in os.environ:
    os.environ["MLX_DPO_CACHE"] = tempfile.mkdtemp(prefix="mlx_dpo_cache_")
    atexit.register(shutil.rmtree, os.environ["MLX_DPO_CACHE"], ignore_errors=True)
# the CPU kernels without timing them against MLX's own (mlx_dpo.kernel_choice): results must
# not depend on which was faster on a loaded machine; tests/test_kernel_choice.py times nothing
os.environ.setdefault("MLX_DPO_KERNELS", "all=on")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from tiny import build_tiny_model  # noqa: E402

import mlx_dpo  # noqa: E402,F401  (loads the fast BLAS before mlx.core)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A random float32 Qwen2-architecture checkpoint with a ChatML template (tied head)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    """A random float32 Llama-architecture checkpoint with an untied head."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama"), arch="llama", tie_word_embeddings=False
    )
