"""mlx_dpo: Direct Preference Optimization for LoRA adapters on mlx-lm models."""

from mlx_dpo import _blas

_blas.preload()  # must precede the first `import mlx.core` in the process

__version__ = "0.1.0"
__all__ = ["LOSSES", "DPOOutput", "dpo_loss", "dpo_metrics", "sequence_logps", "train"]

# public name -> (module, attribute)
_EXPORTS = {
    "sequence_logps": ("mlx_dpo.logps", "sequence_logps"),
    "LOSSES": ("mlx_dpo.losses", "LOSSES"),
    "DPOOutput": ("mlx_dpo.losses", "DPOOutput"),
    "dpo_loss": ("mlx_dpo.losses", "dpo_loss"),
    "dpo_metrics": ("mlx_dpo.losses", "dpo_metrics"),
    "train": ("mlx_dpo.run", "run_training"),  # `mlx_dpo train` as a function
}


def __getattr__(name: str):
    # Lazy so that `mlx_dpo --version` and the BLAS preload do not pay for importing MLX.
    if name in _EXPORTS:
        import importlib

        module, attribute = _EXPORTS[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'mlx_dpo' has no attribute {name!r}")
