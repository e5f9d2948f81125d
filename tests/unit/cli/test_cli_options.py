"""The command line generated from the option groups (`undo_cli.cli.options.with_options`)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from undo_cli.cli.options import with_options
from undo_cli.options import (
    ATTACK_TRAIN,
    DISTILL,
    DISTILL_NOISE,
    TRAIN,
    UNLEARN,
    AttackConfig,
    DataOptions,
    GateOptions,
    NoiseOptions,
    OutputOptions,
    TrainConfig,
)
from undo_cli.options.rates import default_lr


def make_app(command: str, train_default: TrainConfig = TrainConfig(), **kwargs):
    app = typer.Typer()
    seen: dict = {}

    @app.command()
    @with_options(command, **kwargs)
    def run(name: str = typer.Argument("x"), *, train: TrainConfig = train_default,
            data: DataOptions, output: OutputOptions) -> None:
        seen.update(name=name, train=train, data=data, output=output)

    return app, seen


def invoke(app, *args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_fields_become_options_and_groups_arrive_checked():
    app, seen = make_app("train", TRAIN, train=TrainConfig, data=DataOptions,
                         output=OutputOptions)
    r = invoke(app, "y", "--lr", "3e-3", "--max-length", "64", "--packing", "concat",
               "--batch-size", "2", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert seen["name"] == "y"
    assert seen["train"].lr == 3e-3 and seen["train"].batch_size == 2
    assert seen["data"] == DataOptions(max_length=64, packing="concat")
    assert seen["output"].json and seen["output"].quiet and not seen["output"].overwrite
    # The command's defaults apply (train: --lr decided later, from the preset or checkpoint):
    # the group the function declares as its default, the same the stage function takes.
    r = invoke(app)
    assert seen["train"].lr is None and seen["train"].schedule == "cosine"
    assert seen["train"] == TRAIN


def test_every_command_defaults_to_its_stage_functions_own_defaults():
    """The command line reads a command's defaults from its signature; each is the very group
    instance the stage function takes as its own parameter default."""
    import inspect

    from undo_cli.cli import distill_cmd, relearn_cmd, train_cmd, unlearn_cmd
    from undo_cli.distill import distill_checkpoint
    from undo_cli.training import train_checkpoint
    from undo_cli.unlearn import unlearn_checkpoint

    def default(func, name):
        return inspect.signature(inspect.unwrap(func)).parameters[name].default

    cli_default = {cmd: inspect.signature(func.__wrapped_command__).parameters
                   for cmd, func in (("train", train_cmd.train_command),
                                     ("unlearn", unlearn_cmd.unlearn_command),
                                     ("distill", distill_cmd.distill_command),
                                     ("relearn", relearn_cmd.relearn_command))}
    assert cli_default["train"]["train"].default is default(train_checkpoint, "train")
    assert cli_default["unlearn"]["train"].default is default(unlearn_checkpoint,
                                                              "train_config")
    assert cli_default["distill"]["train"].default is default(distill_checkpoint, "train")
    assert cli_default["distill"]["noise"].default is default(distill_checkpoint, "noise")
    assert cli_default["relearn"]["train"].default is ATTACK_TRAIN
    # and what each decides: lr by the model (None), the budgets, the schedules.
    assert (TRAIN.lr, UNLEARN.lr, UNLEARN.schedule) == (None, None, "constant")
    assert DISTILL.lr == default_lr("distill") and DISTILL_NOISE.alpha is None
    assert ATTACK_TRAIN.schedule == "constant" and ATTACK_TRAIN.eval_every == 25


def test_excluded_fields_are_not_offered_and_keep_the_command_default():
    app, seen = make_app("relearn-attack", ATTACK_TRAIN, train=TrainConfig, data=DataOptions,
                         output=OutputOptions, exclude=("lr", "max_steps"))
    r = invoke(app, "--lr", "1e-3")
    assert r.exit_code != 0 and "No such option" in r.output
    assert invoke(app).exit_code == 0
    assert seen["train"].schedule == "constant" and seen["train"].eval_every == 25


def test_bad_values_fail_at_parse_time_naming_the_flag():
    import pytest

    from undo_cli.errors import UsageError

    app, _ = make_app("train", train=TrainConfig, data=DataOptions, output=OutputOptions)
    with pytest.raises(UsageError, match="--weight-decay must be a finite number"):
        invoke(app, "--weight-decay", "inf")


def test_parse_hooks_and_list_fields():
    app = typer.Typer()
    seen = {}

    @app.command()
    @with_options("relearn-attack", attack=AttackConfig)
    def run(*, attack: AttackConfig) -> None:
        seen["attack"] = attack

    assert invoke(app, "--lrs", "1e-4,1e-3", "--seeds", "2", "--lora").exit_code == 0
    assert seen["attack"].lrs == [1e-4, 1e-3] and seen["attack"].seeds == 2
    assert seen["attack"].lora
    assert invoke(app).exit_code == 0
    assert seen["attack"].lrs is None  # each optimizer's own grid when --lrs is not given
    assert len(seen["attack"].lr_grid("adamw")) == 10


def test_repeatable_options_with_a_parse_hook_take_each_use_as_one_text():
    """--fail-if (repeatable) gets one expression per use, parsed when the group is built;
    --optimizers (one comma-separated text) stays one text."""
    import pytest

    from undo_cli.errors import UsageError

    app = typer.Typer()
    seen = {}

    @app.command()
    @with_options("relearn-attack", attack=AttackConfig, gates=GateOptions, noise=NoiseOptions)
    def run(*, attack: AttackConfig, gates: GateOptions, noise: NoiseOptions) -> None:
        seen.update(attack=attack, gates=gates, noise=noise)

    r = invoke(app, "--optimizers", "adamw,sgd", "--fail-if", "a.x > 1", "--fail-if",
               "b < 2 * a.x", "--include", "mlp", "--include", "q_proj")
    assert r.exit_code == 0, r.output
    assert seen["attack"].optimizers == ["adamw", "sgd"]
    assert seen["gates"].fail_if == ["a.x > 1", "b < 2 * a.x"]
    assert [c.expr.names() for c in seen["gates"].fail_if] == [{"a.x"}, {"a.x", "b"}]
    assert [p.regex.pattern for p in seen["noise"].include] == ["mlp", "q_proj"]
    assert invoke(app).exit_code == 0
    assert seen["gates"].fail_if == [] and seen["noise"].include == []
    with pytest.raises(UsageError, match="cannot parse --fail-if 'a.x >'"):
        invoke(app, "--fail-if", "a.x > 1", "--fail-if", "a.x >")


def _numeric_options():
    """(command path, command, flag, kind) of every numeric option of every command."""
    from typer.main import get_command

    from undo_cli.cli import app

    found = []

    def walk(command, path):
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
            return
        for param in command.params:
            if param.param_type_name != "option" or not param.opts[0].startswith("--"):
                continue
            kind = str(param.bare_type())  # "float", "int" (typer's own type names)
            if kind in ("float", "int") and not param.is_flag:
                found.append((path, command, param.opts[0], kind))

    walk(get_command(app), [])
    return found


def test_every_numeric_option_of_every_command_is_validated_at_parse_time(cli, tmp_path):
    """Issue 19: inf, nan and 2**70 are refused (exit 2) naming the flag, before any work,
    for every numeric option, including those a command declares with typer itself."""
    options = _numeric_options()
    commands = {" ".join(path) for path, *_ in options}
    assert {"init", "data arithmetic", "train", "unlearn", "perturb", "distill",
            "relearn-attack", "eval"} <= commands
    assert len(options) > 60
    failures = []
    for path, command, flag, kind in options:
        required = [p for p in command.params if p.param_type_name == "argument"
                    and p.required]
        positional = [str(tmp_path / f"arg{i}") for i, _ in enumerate(required)]
        extra = {"distill": ["--student", "random"]}.get(path[0], [])
        for p in command.params:  # required options: a valid method, else a path
            if p.param_type_name == "option" and p.required:
                extra += [p.opts[0], {"--method": "ga"}.get(p.opts[0], str(tmp_path / "x"))]
        for value in (["inf", "nan"] if kind == "float" else [str(2**70)]):
            result = cli(*path, *positional, *extra, flag, value)
            if result.exit_code != 2 or flag not in result.stderr:
                failures.append(f"{' '.join(path)} {flag} {value}: exit {result.exit_code}: "
                                f"{result.stderr.strip()}")
    assert not failures, "\n".join(failures)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
