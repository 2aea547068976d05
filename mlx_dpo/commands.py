"""After-training commands (eval, compare, fuse, plot). Interface stub: COMMANDS is a list of
click commands that cli.py adds to the `mlx_dpo` group."""

COMMANDS: list = []
