"""`mlx_dpo bench`: run the benchmark (benchmarks/bench.py of a source checkout).

The benchmark measures in fresh processes (the BLAS choice is fixed when MLX loads; torch must
not share a process with the OpenBLAS preload), so this command only starts it with the same
interpreter and passes every argument through.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@click.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Time and size one DPO step; --compare-torch adds the same step in PyTorch.

    All options are the benchmark's own: `mlx_dpo bench --help`.
    """
    if not SCRIPT.exists():
        raise click.ClickException(
            "`mlx_dpo bench` runs benchmarks/bench.py from a source checkout of mlx_dpo "
            "(git clone, then run it from there); the installed package does not ship it"
        )
    sys.exit(subprocess.call([sys.executable, str(SCRIPT), *args]))
