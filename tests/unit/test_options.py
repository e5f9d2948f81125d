"""Option groups: every setting declared once, checked with a message naming its flag."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from undo_cli.errors import UsageError
from undo_cli.options import (
    COMMAND_HELP,
    AttackConfig,
    AttackMeasurement,
    DataOptions,
    DistillOptions,
    EvalOptions,
    GateOptions,
    LoadOptions,
    NoiseOptions,
    OutputOptions,
    RunSpec,
    TrainConfig,
    UnlearnOptions,
    check,
    flag_of,
)

GROUPS = (TrainConfig, DataOptions, EvalOptions, LoadOptions, OutputOptions, UnlearnOptions,
          DistillOptions, NoiseOptions, AttackConfig, AttackMeasurement, GateOptions)


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_every_option_has_help_and_a_flag(group):
    for f in fields(group):
        assert f.metadata.get("help"), f"{group.__name__}.{f.name} has no help"
        if f.metadata["cli"]:
            assert flag_of(f).startswith("--") and " " not in flag_of(f)
    group()  # the defaults are valid
    check(group())


def test_command_help_names_real_fields():
    from undo_cli.options.commands import (
        EvalRunOptions,
        InitOptions,
        PerturbRunOptions,
        ProbeOptions,
        ReportOptions,
    )
    from undo_cli.options.groups import SaveOptions

    names = {f.name for g in (*GROUPS, SaveOptions, InitOptions, EvalRunOptions, ProbeOptions,
                              ReportOptions, PerturbRunOptions) for f in fields(g)}
    for command, values in COMMAND_HELP.items():
        assert set(values) <= names, command


@pytest.mark.parametrize("value, message", [
    (math.inf, "--lr must be a finite number (got inf)"),
    (math.nan, "--lr must be a finite number (got nan)"),
    (0.0, "--lr must be greater than 0 (got 0)"),
    (-1e-3, "--lr must be greater than 0"),
])
def test_numbers_are_checked_naming_the_flag(value, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(TrainConfig(lr=value))


def test_ranges_choices_and_flags_other_than_the_field_name():
    with pytest.raises(UsageError, match="--batch-size must be at least 1"):
        check(TrainConfig(batch_size=0))
    with pytest.raises(UsageError, match="--weight-decay must be a finite number"):
        check(TrainConfig(weight_decay=math.inf))
    with pytest.raises(UsageError, match="--schedule must be one of constant, linear, cosine"):
        check(TrainConfig(schedule="sawtooth"))
    with pytest.raises(UsageError, match="--sam must be at least 0"):  # field sam_rho
        check(TrainConfig(sam_rho=-0.1))
    with pytest.raises(UsageError, match="--alpha must be at most 1"):
        check(NoiseOptions(alpha=1.5))
    with pytest.raises(UsageError, match="--seed is out of range"):
        check(TrainConfig(seed=2**70))
    with pytest.raises(UsageError, match="--lrs must be a finite number"):
        check(AttackConfig(lrs=[1e-3, math.nan]))
    with pytest.raises(UsageError, match="--packing must be one of documents, concat, none"):
        check(DataOptions(packing="random"))


def test_cross_field_validation():
    with pytest.raises(UsageError, match="no training budget"):
        TrainConfig().validate()
    with pytest.raises(UsageError, match="--min-lr must lie between 0 and --lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3, max_steps=1).validate()
    with pytest.raises(UsageError, match="--resume needs a state directory"):
        TrainConfig(max_steps=1, resume=True).validate()
    with pytest.raises(UsageError, match="--alpha and --beta go together"):
        NoiseOptions(alpha=0.5, beta=None).validate()
    cfg = TrainConfig(max_steps=1).for_output("runs/x")
    assert str(cfg.state_dir) == "runs/x.undo-state"
    manifest = TrainConfig(max_steps=3).manifest()
    assert manifest["max_steps"] == 3 and "state_dir" not in manifest and "device" not in manifest


def test_attack_config_derives_its_grid():
    attack = AttackConfig(lrs=[1e-4], seeds=3, train=TrainConfig(seed=5, max_steps=1))
    assert attack.seed_list() == [5, 6, 7]
    assert attack.mode == "full" and attack.eval_every == 25
    run = attack.run_config(RunSpec(lr=1e-4, seed=6))
    assert (run.lr, run.seed, run.max_steps, run.keep_last_finite) == (1e-4, 6, 500, True)
    assert AttackConfig(lora=True).mode == "lora"
    attack.finetune = False
    assert attack.mode == "none"
    with pytest.raises(UsageError, match="--quantize 8|4"):
        attack.validate()
