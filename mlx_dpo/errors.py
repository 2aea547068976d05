"""The errors a user can fix; the CLI prints them as one line and exits with status 2.

Light on purpose: the CLI imports this before MLX, mlx-lm or transformers, so that a bad flag
or config is reported at once.
"""

from mlx_dpo.config import ConfigError
from mlx_dpo.data_sources import DataError


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


class RunError(ValueError):
    """A run directory that cannot be used as asked: locked, holding other files, incompatible
    with `--resume`, without an intact checkpoint, or not writable. Nothing in it was changed."""


USER_ERRORS = (ConfigError, DataError, ModelError, RunError)
