"""The command line as a whole: help, version, exit codes, entry points."""

from __future__ import annotations

import subprocess
import sys

from undo_cli import __version__


def test_help_lists_every_command_with_a_description(cli):
    from typer.main import get_command

    from undo_cli.cli import app

    group = get_command(app)
    result = cli("--help")
    assert result.exit_code == 0
    assert group.commands, "no commands registered"
    for name, command in group.commands.items():
        assert name in result.stdout
        assert (command.help or command.short_help), f"{name} has no description"


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"undo {__version__}"


def test_unknown_command_and_option_are_usage_errors(cli):
    for args in (["frobnicate"], ["init"], ["init", "x", "--no-such-option"]):
        result = cli(*args)
        assert result.exit_code == 2
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "undo_cli", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and __version__ in done.stdout
