"""The README is true as written: it opens with the two commands, installs only from the
checkout (or git, no package-index name), every `mlx_dpo` command in it parses (subcommand,
flags and values exist), and its Python snippet runs and prints the numbers it claims. (CI runs
the README's two opening commands and the "After training" commands for real.)"""

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from mlx_dpo import cli

README = Path(__file__).parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
    commands = []
    for block in blocks("bash"):
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
    first = blocks("bash")[0].splitlines()
    assert first[0].startswith("pip install . && mlx_dpo train")
    assert first[1].startswith('pip install ".[test]" && python -m pytest')


def test_install_lines_use_the_checkout_or_git():
    """No `pip install mlx-dpo`: the package is not on an index. Prose included."""
    installs = re.findall(r"pip install ([^`\n&]+)", README.read_text())
    assert installs
    for target in installs:
        target = target.strip().split()[0]
        assert target == "." or target.startswith(('".[', '"git+')), target


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    args = shlex.split(command)[1:]
    group = cli.main
    while isinstance(group, click.Group):
        name, args = args[0], args[1:]
        assert name in group.commands, f"{command}: no subcommand {name}"
        group = group.commands[name]
    group.make_context(group.name, args)  # raises on an unknown flag or a bad value


@pytest.mark.slow
def test_python_snippet_runs_as_written(tmp_path):
    (snippet,) = blocks("python")
    done = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if not line.startswith(" ")]
    # by hand: log-ratios chosen (1, 0.5), rejected (-1, 0.5); sigmoid DPO, beta 0.1
    loss = -(math.log(1 / (1 + math.exp(-0.2))) + math.log(0.5)) / 2
    printed = [line for line in lines if line.startswith("0.6")][0]
    assert float(printed.split()[0]) == pytest.approx(loss, abs=1e-6)
    assert f"{2 * math.log(1 / 5):.4f}" in " ".join(f"{float(x):.4f}" for x in _numbers(lines))
    accuracy = float(done.stdout.strip().splitlines()[-1])  # the run's validation accuracy
    assert 0 <= accuracy <= 1
    assert (tmp_path / "runs" / "api" / "adapters.safetensors").is_file()


def _numbers(lines: list[str]) -> list[str]:
    return [w for line in lines for w in line.split() if re.fullmatch(r"-?\d+\.\d+", w)]


def test_links_to_docs_resolve():
    root = README.parent
    for page in [README, *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
