"""mlx_dpo: Direct Preference Optimization for LoRA adapters on mlx-lm models."""

from mlx_dpo import _blas

_blas.preload()  # must precede the first `import mlx.core` in the process

__version__ = "0.1.0"
__all__ = ["LOSSES", "DPOOutput", "dpo_loss", "dpo_metrics", "sequence_logps", "train"]

_EXPORTS = {
    "sequence_logps": "mlx_dpo.logps",
    "LOSSES": "mlx_dpo.losses",
    "DPOOutput": "mlx_dpo.losses",
    "dpo_loss": "mlx_dpo.losses",
    "dpo_metrics": "mlx_dpo.losses",
    "train": "mlx_dpo.run",
}


def __getattr__(name: str):
    # Lazy so that `mlx_dpo --version` and the BLAS preload do not pay for importing MLX.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mlx_dpo' has no attribute {name!r}")
