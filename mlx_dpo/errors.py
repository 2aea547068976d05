"""The errors a user can fix; the CLI prints them as one line and exits with status 2."""

from mlx_dpo.config import ConfigError
from mlx_dpo.data import DataError
from mlx_dpo.model import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError)
