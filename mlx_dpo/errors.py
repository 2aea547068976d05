"""The errors a user can fix; the CLI prints them as one line and exits with status 2."""

from mlx_dpo.config import ConfigError
from mlx_dpo.data import DataError
from mlx_dpo.model import ModelError


class RunError(ValueError):
    """A run directory that cannot be used as asked: locked, holding other files, incompatible
    with `--resume`, without an intact checkpoint, or not writable. Nothing in it was changed."""


USER_ERRORS = (ConfigError, DataError, ModelError, RunError)
