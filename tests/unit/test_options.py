"""Option groups: every setting declared once, checked with a message naming its flag."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path

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


def test_search_storage_is_checked_when_parsed(tmp_path):
    """`--search-storage` (issue 26): a new or empty file, or a study database, is taken; an
    unknown scheme, an in-memory study, a missing directory, a directory, a file that is not
    SQLite and another program's database are refused naming the flag."""
    import sqlite3

    from undo_cli.options.storage import parse_search_storage, sqlite_path

    new = f"sqlite:///{tmp_path / 'new.db'}"
    assert parse_search_storage(new) == new and sqlite_path(new) == tmp_path / "new.db"
    assert sqlite_path("sqlite:///rel/study.db?timeout=5") == Path("rel/study.db")
    (tmp_path / "empty.db").write_bytes(b"")
    parse_search_storage(f"sqlite:///{tmp_path / 'empty.db'}")
    study = sqlite3.connect(tmp_path / "study.db")
    study.execute("CREATE TABLE studies (id)")
    study.execute("CREATE TABLE trials (id)")
    study.commit()
    study.close()
    parse_search_storage(f"sqlite:///{tmp_path / 'study.db'}")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE accounts (id)")
    other.commit()
    other.close()
    (tmp_path / "notes.txt").write_text("not a database\n")
    for url, message in (
            ("redis://localhost/0", "unknown scheme 'redis'"),
            ("study.db", "is not a storage URL"),
            ("sqlite://", "in-memory"),
            (f"sqlite:///{tmp_path / 'no' / 'study.db'}", "does not exist"),
            (f"sqlite:///{tmp_path}", "is a directory"),
            (f"sqlite:///{tmp_path / 'notes.txt'}", "is not an SQLite database"),
            (f"sqlite:///{tmp_path / 'other.db'}", "an SQLite database of something else")):
        with pytest.raises(UsageError, match="--search-storage") as e:
            parse_search_storage(url)
        assert message in str(e.value)
    with pytest.raises(UsageError, match="does not exist"):  # the library checks it too
        AttackConfig(search=2, search_storage=f"sqlite:///{tmp_path / 'no' / 'x.db'}").validate()


def test_a_group_parses_and_checks_itself_when_built():
    """Parse, don't validate: structured text becomes a typed value once, when the group is
    built (also from Python); an invalid group cannot exist."""
    import json
    import pickle
    from dataclasses import replace

    from undo_cli.options import SaveOptions
    from undo_cli.options.text import ByteSize, LayerRange, Pattern

    save = SaveOptions(max_shard_size="500MiB")
    assert isinstance(save.max_shard_size, ByteSize) and save.max_shard_size.bytes == 500 * 2**20
    noise = NoiseOptions(layers="4-6,1", include=["mlp", r"\.q_proj"])
    assert isinstance(noise.layers, LayerRange) and noise.layers.layers == (1, 4, 5, 6)
    assert all(isinstance(p, Pattern) for p in noise.include)
    assert noise.include[1].regex.search("model.layers.0.self_attn.q_proj.weight")
    # The text given is what undo.json records; copies keep the parsed values.
    assert json.loads(json.dumps({"layers": noise.layers, "include": noise.include})) == {
        "layers": "4-6,1", "include": ["mlp", r"\.q_proj"]}
    assert replace(noise, alpha=0.3).layers.layers == (1, 4, 5, 6)
    assert pickle.loads(pickle.dumps(save)).max_shard_size.bytes == 500 * 2**20
    for build, flag in ((lambda: SaveOptions(max_shard_size="lots"), "--max-shard-size"),
                        (lambda: NoiseOptions(layers="3-1"), "--layers"),
                        (lambda: NoiseOptions(exclude=["("]), "--exclude"),
                        (lambda: NoiseOptions(alpha=0.5, beta=None), "--alpha and --beta"),
                        (lambda: DistillOptions(train_layers="x"), "--train-layers"),
                        (lambda: DistillOptions(train_pattern="["), "--train"),
                        (lambda: DistillOptions(hidden_layers="1"), "--hidden-layers needs"),
                        (lambda: TrainConfig(lr=1e-3, min_lr=1e-2), "--min-lr"),
                        (lambda: TrainConfig(batch_size=0), "--batch-size")):
        with pytest.raises(UsageError, match=flag):
            build()


def test_gate_expressions_parse_once_when_the_group_is_built():
    """--fail-if, --keep-best and --stop-when become typed values (the text given, carrying
    the parsed expression) when their group is built; a malformed one cannot be built, and
    nothing parses the text again."""
    import json
    import pickle
    from dataclasses import replace

    from undo_cli.options.commands import ReportOptions
    from undo_cli.options.text import Condition, KeepBest, StopWhen

    gates = GateOptions(fail_if=["a.x > 0.5", "b < a.x * 2"])
    assert all(isinstance(c, Condition) for c in gates.fail_if)
    assert [c.expr.evaluate({"a": {"x": 0.75}, "b": 1.0}) for c in gates.fail_if] == [True, True]
    assert replace(gates).fail_if[1].expr is gates.fail_if[1].expr  # not parsed again
    train = TrainConfig(keep_best="max r.accuracy - f.accuracy")
    assert isinstance(train.keep_best, KeepBest) and train.keep_best.objective.maximize
    assert not TrainConfig(keep_best="r.loss").keep_best.objective.maximize
    assert replace(train, lr=1e-3).keep_best.objective is train.keep_best.objective
    distill = DistillOptions(stop_when="retain.accuracy >= teacher - 0.05")
    assert isinstance(distill.stop_when, StopWhen)
    assert distill.stop_when.condition.holds({"retain.accuracy": 0.9}, {"retain.accuracy": 0.9})
    assert distill.stop_when.condition.metrics_needed() == {"retain.accuracy"}
    # undo report's verdict tests are rewritten for the language; the value stays as given
    report = ReportOptions(fail_if=['matrix.prune.undo.verdict == "recovered"'])
    assert report.fail_if == ['matrix.prune.undo.verdict == "recovered"']
    assert report.fail_if[0].expr.evaluate({"matrix.prune.undo.verdict_is_recovered": 1.0})
    # undo.json and --json record the text given; copies keep the parsed values
    assert json.loads(json.dumps({"keep_best": train.keep_best, "fail_if": gates.fail_if,
                                  "stop_when": distill.stop_when})) == {
        "keep_best": "max r.accuracy - f.accuracy", "fail_if": ["a.x > 0.5", "b < a.x * 2"],
        "stop_when": "retain.accuracy >= teacher - 0.05"}
    assert json.loads(json.dumps(train.manifest()))["keep_best"] == "max r.accuracy - f.accuracy"
    assert pickle.loads(pickle.dumps(train)).keep_best.objective.maximize
    assert pickle.loads(pickle.dumps(gates)).fail_if[0].expr.evaluate({"a.x": 0.1}) is False
    # empty text is off, as before
    assert TrainConfig(keep_best="").keep_best == "" and not DistillOptions(stop_when="").stop_when
    for build, message in (
            (lambda: GateOptions(fail_if=["a.x > 1", "a.x >"]), "cannot parse --fail-if 'a.x >'"),
            (lambda: GateOptions(fail_if=["a.x"]), "--fail-if 'a.x' is a number, not a"),
            (lambda: ReportOptions(fail_if=["m.f.x.verdict == 'won'"]), "--fail-if .* verdict"),
            (lambda: TrainConfig(keep_best="r.loss >"), "--keep-best"),
            (lambda: TrainConfig(keep_best="r.accuracy - f.accuracy"), "--keep-best .* say"),
            (lambda: TrainConfig(keep_best="r.loss < 1"), "--keep-best .* is a condition"),
            (lambda: DistillOptions(stop_when="retain.accuracy >="), "--stop-when: cannot parse"),
            (lambda: DistillOptions(stop_when="teacher > 1"), "--stop-when .* bare 'teacher'"),
            (lambda: DistillOptions(stop_when="teacher.r.loss > 1"), "names no student metric")):
        with pytest.raises(UsageError, match=message):
            build()


def test_declared_reads_find_the_files_an_option_names(tmp_path):
    from undo_cli.options.paths import existing, named_paths, sqlite_path, weighted_paths

    data, db = tmp_path / "d.jsonl", tmp_path / "s.db"
    data.write_text("{}\n")
    db.write_bytes(b"")
    assert named_paths([f"forget={data}", "x=arithmetic:retain_eval"]) == [
        str(data), "arithmetic:retain_eval"]
    assert existing("--data", [f"{data}:0.5", str(data)], weighted_paths) == [
        ("--data", data), ("--data", data)]
    assert existing("--search-storage", f"sqlite:///{db}", sqlite_path) == [
        ("--search-storage", db)]
    assert existing("--search-storage", "postgresql://host/db", sqlite_path) == []
    assert existing("--eval", ["x=" + "y" * 5000], named_paths) == []  # not a file: no error


def test_tokenizer_text_is_parsed_once_when_its_group_is_built(tmp_path):
    from dataclasses import replace

    from undo_cli.options.commands import InitOptions
    from undo_cli.options.inputs import TrainInputs

    escaped = InitOptions(tokenizer="char:ab\\u00e4")
    assert escaped.tokenizer == "char:ab\\u00e4"  # recorded as given
    assert (escaped.tokenizer.kind, escaped.tokenizer.alphabet) == ("char", "ab\u00e4")
    assert InitOptions().tokenizer.kind == "char" and InitOptions().tokenizer.alphabet is None
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    bpe = InitOptions(tokenizer="bpe:300", tokenizer_data=[data])
    assert (bpe.tokenizer.kind, bpe.tokenizer.size) == ("bpe", 300)
    assert replace(bpe, seed=1).tokenizer is bpe.tokenizer  # nothing parsed again
    (tmp_path / "tok.json").write_text("{}")
    assert InitOptions(tokenizer=str(tmp_path / "tok.json")).tokenizer.kind == "path"
    assert InitOptions(tokenizer=str(tmp_path)).tokenizer.kind == "path"
    for text, message in ((str(tmp_path / "missing.json"), "expected 'char', 'char:ALPHABET'"),
                          (str(data), "expected 'char'"),  # a file, not a tokenizer.json
                          ("bpe:259", "must hold 260 .. 1,000,000"),
                          ("bpe:1000001", "must hold 260"), ("bpe:x", "expected bpe:N")):
        with pytest.raises(UsageError, match=re.escape(message)):
            InitOptions(tokenizer=text, tokenizer_data=[data])
    with pytest.raises(UsageError, match="only used by --tokenizer bpe"):
        InitOptions(tokenizer_data=[data])
    with pytest.raises(UsageError, match="needs --tokenizer-data"):
        InitOptions(tokenizer="bpe:300")
    with pytest.raises(UsageError, match="train a BPE tokenizer with `undo init"):
        TrainInputs(init="tiny", data=["x"], tokenizer="bpe:300")
    assert TrainInputs(init="tiny", data=["x"]).tokenizer is None


def test_named_paths_are_parsed_once_when_their_group_is_built():
    from dataclasses import replace

    from undo_cli.options import EvalOptions
    from undo_cli.options.inputs import ProbeInputs

    evals = EvalOptions(eval=["forget=a/f.jsonl", "b/retain.jsonl", "x=C:=odd"])
    assert evals.eval == ["forget=a/f.jsonl", "b/retain.jsonl", "x=C:=odd"]  # as given
    assert evals.sets == [("forget", "a/f.jsonl"), ("retain", "b/retain.jsonl"),
                          ("x", "C:=odd")]
    assert replace(evals, max_new_tokens=4).eval[0] is evals.eval[0]  # nothing parsed again
    for specs, message in ((["a=f.jsonl", "a=g.jsonl"], "--eval name 'a' is used twice"),
                           (["f.jsonl", "d/f.jsonl"], "--eval name 'f' is used twice"),
                           (["=f.jsonl"], "--eval '=f.jsonl': expected NAME=PATH"),
                           (["a="], "expected NAME=PATH"),
                           (["1a=f"], "NAME may use letters, digits and '_' only"),
                           (["a.b=f"], "NAME may use letters")):
        with pytest.raises(UsageError, match=re.escape(message)):
            EvalOptions(eval=specs)
    with pytest.raises(UsageError, match=re.escape("--data name 'p' is used twice")):
        ProbeInputs(data=["p=x.jsonl", "p=y.jsonl"])
    assert [(s.name, s.path) for s in ProbeInputs(data=["q=x.jsonl"]).data] == [("q", "x.jsonl")]


def test_lora_targets_are_parsed_once_when_the_attack_is_built():
    from undo_cli.options import AttackConfig

    assert AttackConfig().lora_targets.modules == "all-linear"
    named = AttackConfig(lora=True, lora_targets=" q_proj, v_proj ,")
    assert named.lora_targets == " q_proj, v_proj ,"  # recorded as given
    assert named.lora_targets.modules == ["q_proj", "v_proj"]
    with pytest.raises(UsageError, match="--lora-targets is empty"):
        AttackConfig(lora=True, lora_targets=" , ").validate()
    AttackConfig(lora_targets="").validate()  # without --lora it is not used
