"""Start-up cost: `undo --help`, `--version`, every command's `--help` (but unlearn's, which
lists the registered methods) and `undo perturb` import neither torch nor transformers.

Each check runs in a fresh interpreter (this test process has imported torch already).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers")
# Commands whose help is built from a torch-importing module (lazily, see `lazy_help`).
HELP_NEEDS_TORCH = {("unlearn",)}


def _fresh(script: str) -> dict:
    """Run `script` in a new interpreter; it prints one JSON document as its last line."""
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


_HELP_SCRIPT = """
import json, sys

import typer
from typer.testing import CliRunner

from undo_cli.cli import app

HEAVY = ("torch", "transformers")
SKIP = {tuple(path) for path in json.loads(sys.argv[1])}


def commands(group, path=()):
    for name, command in group.commands.items():
        yield path + (name,)
        if hasattr(command, "commands"):
            yield from commands(command, path + (name,))


runner = CliRunner()
heavy = [m for m in HEAVY if m in sys.modules]
report = {"runs": [], "imported_by": {"args": "import undo_cli.cli", "modules": heavy}
          if heavy else None}
root = typer.main.get_command(app)
calls = [["--help"], ["--version"]] + [
    [*path, "--help"] for path in commands(root) if path not in SKIP]
for args in calls:
    result = runner.invoke(app, args, prog_name="undo")
    report["runs"].append({"args": args, "exit_code": result.exit_code,
                           "output": result.output})
    heavy = [m for m in HEAVY if m in sys.modules]
    if heavy and report["imported_by"] is None:
        report["imported_by"] = {"args": args, "modules": heavy}
report["commands"] = [list(path) for path in commands(root)]
report["heavy"] = [m for m in HEAVY if m in sys.modules]
print(json.dumps(report))
"""


def test_help_and_version_import_no_torch() -> None:
    script = _HELP_SCRIPT.replace("json.loads(sys.argv[1])",
                                  repr([list(p) for p in HELP_NEEDS_TORCH]))
    report = _fresh(script)
    assert report["heavy"] == [], f"imported {report['imported_by']}"
    for run in report["runs"]:
        assert run["exit_code"] == 0, run
    runs = {tuple(run["args"]): run["output"] for run in report["runs"]}
    assert runs[("--version",)].startswith("undo ")
    # Every command is listed in `undo --help`, with its short help (unlearn's too).
    top = [path[0] for path in map(tuple, report["commands"]) if len(path) == 1]
    assert {"init", "data", "train", "unlearn", "perturb", "distill", "relearn-attack", "eval",
            "report"} <= set(top)
    for name in top:
        assert f" {name} " in runs[("--help",)], name
    assert "Suppress a capability" in runs[("--help",)]
    # Every command but unlearn had its own --help checked.
    checked = {tuple(run["args"][:-1]) for run in report["runs"] if run["args"][-1:] == ["--help"]}
    assert {tuple(p) for p in report["commands"]} - checked == HELP_NEEDS_TORCH


def test_light_library_modules_import_no_torch(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))  # headers are read
    report = _fresh(f"""
        import json, sys

        import undo_cli.runtime
        from undo_cli.checkpoint import (atomic_output, build_manifest, check_output_path,
                                         copy_support_files, inspect_checkpoint, write_manifest)

        info = inspect_checkpoint({str(tmp_path)!r})
        manifest = build_manifest("test", arguments={{}}, parents={{"input": info.path}})
        print(json.dumps({{"environment": manifest["environment"],
                          "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}}))
    """)
    assert report["heavy"] == []
    # The versions are those of the installed libraries, read without importing them.
    import transformers

    assert report["environment"]["torch"] == str(torch.__version__)
    assert report["environment"]["transformers"] == transformers.__version__


def test_perturb_imports_no_torch(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "noised"
    report = _fresh(f"""
        import json, sys

        from typer.testing import CliRunner

        from undo_cli.cli import app

        result = CliRunner().invoke(app, ["perturb", {str(tiny_llama)!r}, {str(out)!r}])
        print(json.dumps({{"exit_code": result.exit_code, "output": result.output,
                          "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}}))
    """)
    assert report["exit_code"] == 0, report["output"]
    assert report["heavy"] == []
    assert (out / "model.safetensors").is_file()


def test_unlearn_help_is_built_lazily() -> None:
    from typer.testing import CliRunner

    from undo_cli.cli import app
    from undo_cli.unlearn import METHODS

    result = CliRunner().invoke(app, ["unlearn", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for method in METHODS.values():
        assert f"{method.name}: L = " in result.output
    assert f"Unlearning method: {', '.join(METHODS)} (formulas above)." in result.output


def test_lazy_help_rejects_unknown_options() -> None:
    import typer

    from undo_cli.cli.common import lazy_help

    app = typer.Typer()

    @app.command(cls=lazy_help(lambda: "help", options={"nope": lambda: "?"}))
    def command(name: str = typer.Option("x")) -> None:
        """Doc."""

    with pytest.raises(TypeError, match="nope"):
        typer.main.get_command(app)
