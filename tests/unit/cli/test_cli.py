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


def test_library_warnings_show_only_with_debug(cli, tmp_path, monkeypatch):
    """torch/numpy/transformers warnings never reach stderr without --debug."""
    import warnings

    import undo_cli.synthetic as synthetic

    real = synthetic.generate_arithmetic

    def noisy(*args, **kwargs):
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        import numpy as np

        np.float32(1e38) * np.float32(1e38)  # numpy: RuntimeWarning (overflow)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_arithmetic", noisy)
    for debug, out in (([], "a"), (["--debug"], "b")):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = cli(*debug, "data", "arithmetic", tmp_path / out, "--train-size", "20",
                         "--eval-size", "8")
        assert result.exit_code == 0
        shown = [str(w.message) for w in seen]
        if debug:
            assert "a library's warning" in shown and any("overflow" in m for m in shown)
        else:
            assert shown == [] and "a library's warning" not in result.stderr


def test_every_error_is_one_line(cli, monkeypatch):
    """A library's report spanning lines, or a path holding a newline or an escape
    sequence, is printed as one line with the control characters escaped."""
    import undo_cli.synthetic as synthetic

    def fail(*args, **kwargs):
        raise RuntimeError("first line\nsecond line\x1b[2J")

    monkeypatch.setattr(synthetic, "generate_arithmetic", fail)
    result = cli("data", "arithmetic", "out\nput")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: RuntimeError: first line\\nsecond line\\x1b[2J (run 'undo --debug ...' for the "
        "traceback)"]


def test_threads_sets_torch_threads_and_refuses_bad_values(cli, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        result = cli("--threads", "1", "init", tmp_path / "m", "--preset", "tiny")
        assert result.exit_code == 0, result.stderr
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for value, message in (("0", "--threads must be at least 1"), ("nan", "'--threads'"),
                           ("x", "'--threads'")):
        result = cli("--threads", value, "init", tmp_path / "n")
        assert result.exit_code == 2
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr and "╭" not in result.stderr
    assert not (tmp_path / "n").exists()


def test_the_cli_makes_idle_openmp_threads_wait_passively(monkeypatch):
    """OMP_WAIT_POLICY=PASSIVE unless the user set a policy (read when torch loads)."""
    import os
    import signal
    import sys

    import pytest

    from undo_cli import cli as cli_module

    # main() installs undo's SIGINT/SIGTERM handlers: give pytest its own back afterwards, or
    # every later test runs with them (and a stray signal ends the session in their frame).
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for preset, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        if preset is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", preset)
        monkeypatch.setattr(sys, "argv", ["undo", "--version"])
        try:
            with pytest.raises(SystemExit):
                cli_module.main()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        assert os.environ["OMP_WAIT_POLICY"] == expected
