"""Every `mlx_dpo` command in the README parses: its subcommand and flags exist and its values
are accepted. (CI runs the README's two opening commands for real.)"""

import re
import shlex
from pathlib import Path

import click
import pytest

from mlx_dpo import cli

README = Path(__file__).parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if " -- mlx_dpo " in part:
                    part = part.split(" -- ", 1)[1]
                if part.startswith("mlx_dpo"):
                    commands.append(part)
    assert commands  # the README shows mlx_dpo commands at all
    return commands


def test_the_readme_opens_with_install_and_test_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).splitlines()
    assert first[0].startswith("pip install . && mlx_dpo train")
    assert first[1].startswith('pip install ".[test]" && python -m pytest')


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    args = shlex.split(command)[1:]
    group = cli.main
    while isinstance(group, click.Group):
        name, args = args[0], args[1:]
        assert name in group.commands, f"{command}: no subcommand {name}"
        group = group.commands[name]
    group.make_context(group.name, args)  # raises on an unknown flag or a bad value
