"""The synthetic arithmetic task: determinism, formats, held-out guarantees, `undo data`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from undo_cli.errors import UsageError
from undo_cli.synthetic import (
    ALPHABET,
    ANSWER_CUE,
    FILES,
    HELDOUT_TEMPLATES,
    OPS,
    PLACEHOLDER,
    SPLIT_OPS,
    TRAIN_TEMPLATES,
    PairSpace,
    arithmetic_records,
    compute,
    generate_arithmetic,
    render,
)
from undo_cli.synthetic_files import INFO_NAME

# Checkers of the held-out guarantee (test-only: the generator never needs them).


def template_fragments(template: str) -> list[str]:
    """The fixed (placeholder-free) pieces of a template, stripped, empty ones dropped."""
    return [p.strip() for p in PLACEHOLDER.split(template)[::3] if p.strip()]


def template_regex(template: str) -> re.Pattern:
    """A pattern matching every text the template renders to (any numbers, names, items);
    groups `a` and `b` capture the operands."""
    out, pos = [], 0
    for m in PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        if m.group(1) in ("a", "b"):
            number = f"(?P<{m.group(1)}>\\d+)"
            out.append(number + r" [A-Za-z]+" if m.group(2) else number)
        else:
            out.append(r"[A-Za-z]+")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))

SMALL = {"train_size": 400, "eval_size": 40}
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
EVAL_EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = ")
SYMBOL_OP = {symbol: op for op, symbol in OPS.items()}
TRAIN_REGEXES = {op: [template_regex(t) for t in ts] for op, ts in TRAIN_TEMPLATES.items()}
HELDOUT_REGEXES = {op: [template_regex(t) for t in ts] for op, ts in HELDOUT_TEMPLATES.items()}


def parse_text(text: str) -> tuple[str, str, int, int, int]:
    """(kind, op, a, b, stated result) of a training record; fails the test if unparsable."""
    m = EQUATION.fullmatch(text)
    if m:
        return "equation", SYMBOL_OP[m.group(2)], int(m.group(1)), int(m.group(3)), \
            int(m.group(4))
    question, cue, answer = text.rpartition(ANSWER_CUE)
    assert cue and answer.isdigit(), f"unparsable training record: {text!r}"
    return ("word", *parse_word(question, TRAIN_REGEXES), int(answer))


def parse_word(question: str, regexes: dict[str, list[re.Pattern]]) -> tuple[str, int, int]:
    hits = [(op, m) for op, rs in regexes.items() for r in rs if (m := r.fullmatch(question))]
    assert len(hits) == 1, f"{question!r} matches {len(hits)} templates"
    op, m = hits[0]
    return op, int(m.group("a")), int(m.group("b"))


def check_operands(op: str, a: int, b: int, add_max: int = 20, mul_max: int = 9) -> None:
    if op in ("add", "sub"):
        assert 0 <= a <= add_max and 0 <= b <= add_max
        if op == "sub":
            assert a >= b
    elif op == "mul":
        assert 1 <= a <= mul_max and 1 <= b <= mul_max
    else:
        assert 1 <= b <= mul_max and a % b == 0 and 1 <= a // b <= mul_max


def eval_pair(rec: dict) -> tuple[str, int, int]:
    if rec["kind"] == "equation":
        m = EVAL_EQUATION.fullmatch(rec["prompt"])
        assert m, rec
        return SYMBOL_OP[m.group(2)], int(m.group(1)), int(m.group(3))
    assert rec["prompt"].endswith(ANSWER_CUE)
    return parse_word(rec["prompt"][: -len(ANSWER_CUE)], HELDOUT_REGEXES)


# ----------------------------------------------------------------------------- generator


def test_same_seed_gives_identical_records_and_other_seeds_differ():
    a = arithmetic_records(seed=3, **SMALL)
    b = arithmetic_records(seed=3, **SMALL)
    c = arithmetic_records(seed=4, **SMALL)
    assert a.records == b.records and a.info == b.info
    for key in ("retain_train", "forget_train", "retain_eval", "forget_eval"):
        assert a.records[key] != c.records[key], key


def test_defaults_have_the_documented_sizes():
    data = arithmetic_records()
    assert set(data.records) == set(FILES)
    for split in SPLIT_OPS:
        assert len(data.records[f"{split}_train"]) == 6000
        evals = data.records[f"{split}_eval"]
        assert len(evals) == 200
        assert data.records[f"{split}_eval_equation"] + data.records[f"{split}_eval_word"] \
            == sorted(evals, key=lambda r: r["kind"] != "equation")
        assert data.records[f"{split}_eval_text"] == [
            {"text": r["prompt"] + r["answer"]} for r in evals]
    size = sum(len(json.dumps(r)) for k in ("retain_train", "forget_train")
               for r in data.records[k])
    assert 100_000 < size < 1_000_000  # "a few hundred KB" of training text


@pytest.mark.parametrize("options", [{}, {"add_max": 7, "mul_max": 4, "eval_size": 12,
                                          "word_fraction": 0.5, "seed": 9}])
def test_every_record_is_well_formed_and_correct(options):
    data = arithmetic_records(**options)
    add_max, mul_max = options.get("add_max", 20), options.get("mul_max", 9)
    for split, ops in SPLIT_OPS.items():
        kinds = set()
        for rec in data.records[f"{split}_train"]:
            assert set(rec) == {"text"}
            kind, op, a, b, result = parse_text(rec["text"])
            kinds.add((kind, op))
            assert op in ops
            check_operands(op, a, b, add_max, mul_max)
            assert result == compute(op, a, b) >= 0
        assert kinds == {(k, op) for k in ("equation", "word") for op in ops}
        for rec in data.records[f"{split}_eval"]:
            assert set(rec) == {"prompt", "answer", "op", "kind"}
            op, a, b = eval_pair(rec)
            assert op == rec["op"] and op in ops
            check_operands(op, a, b, add_max, mul_max)
            assert rec["answer"] == str(compute(op, a, b))
    for records in data.records.values():
        for rec in records:
            for value in rec.values():
                assert set(value) <= set(ALPHABET), value


def test_word_fraction_and_operation_balance():
    data = arithmetic_records(train_size=1000, eval_size=20, word_fraction=0.3)
    for split, ops in SPLIT_OPS.items():
        parsed = [parse_text(r["text"]) for r in data.records[f"{split}_train"]]
        assert sum(p[0] == "word" for p in parsed) == 300
        assert [sum(p[1] == op for p in parsed) for op in ops] == [500, 500]
        evals = data.records[f"{split}_eval"]
        for op in ops:
            assert sum(r["op"] == op and r["kind"] == "equation" for r in evals) == 5
            assert sum(r["op"] == op and r["kind"] == "word" for r in evals) == 5
    assert all(EQUATION.fullmatch(r["text"]) for r in
               arithmetic_records(word_fraction=0.0, **SMALL).records["forget_train"])


def test_operand_pair_spaces():
    for op, n in (("add", 5), ("sub", 5), ("mul", 4), ("div", 4)):
        space = PairSpace(op, add_max=n, mul_max=n)
        pairs = space.pairs()
        assert len(pairs) == len(space) == len(set(pairs))
        if op == "add":
            expected = {(a, b) for a in range(n + 1) for b in range(n + 1)}
        elif op == "sub":
            expected = {(a, b) for a in range(n + 1) for b in range(a + 1)}
        elif op == "mul":
            expected = {(a, b) for a in range(1, n + 1) for b in range(1, n + 1)}
        else:
            expected = {(a * b, b) for a in range(1, n + 1) for b in range(1, n + 1)}
        assert set(pairs) == expected


def test_render_counts_nouns():
    text = render("{a:item} and {b:bag}; {items}, {name}", 1, 2, name="Mia", item="box")
    assert text == "1 box and 2 bags; boxes, Mia"
    assert render("{a:child}", 3, 0) == "3 children"


# ----------------------------------------------------------------------------- held out


def test_templates_are_well_formed_and_heldout_wording_is_new():
    train_templates = [t for ts in TRAIN_TEMPLATES.values() for t in ts]
    for ts in (*TRAIN_TEMPLATES.values(), *HELDOUT_TEMPLATES.values()):
        for t in ts:
            assert t.count("{a") == 1 and t.count("{b") == 1, t
            assert set(render(t, 12, 7)) <= set(ALPHABET), t
    for ts in HELDOUT_TEMPLATES.values():
        for t in ts:
            phrase = max(template_fragments(t), key=len)
            assert len(phrase) >= 10, t
            assert not any(phrase in other for other in train_templates), phrase


@pytest.mark.parametrize("seed", [0, 1])
def test_heldout_templates_never_appear_in_training_data(seed):
    data = arithmetic_records(seed=seed, word_fraction=1.0)  # as many word problems as can be
    train = [r["text"] for k in ("retain_train", "forget_train") for r in data.records[k]]
    phrases = [max(template_fragments(t), key=len)
               for ts in HELDOUT_TEMPLATES.values() for t in ts]
    heldout = [r for ts in HELDOUT_REGEXES.values() for r in ts]
    for text in train:
        assert not any(p in text for p in phrases), text
        assert not any(r.search(text) for r in heldout), text
    # ...while the eval word problems use them, every held-out template of every operation.
    used = {(r["op"], i) for k in ("retain_eval_word", "forget_eval_word")
            for r in data.records[k]
            for i, rx in enumerate(HELDOUT_REGEXES[r["op"]])
            if rx.fullmatch(r["prompt"][: -len(ANSWER_CUE)])}
    assert used == {(op, i) for op, ts in HELDOUT_TEMPLATES.items() for i in range(len(ts))}


def test_eval_items_are_distinct():
    data = arithmetic_records(add_max=6, mul_max=5, eval_size=48)
    for split in SPLIT_OPS:
        evals = data.records[f"{split}_eval"]
        prompts = [r["prompt"] for r in evals]
        assert len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("options", [
    {"heldout_pairs": 0.3, "eval_size": 80},
    {"heldout_pairs": 0.5, "eval_size": 40, "add_max": 6, "mul_max": 5, "seed": 2,
     "word_fraction": 0.5},
])
def test_heldout_pairs_are_absent_from_all_training_text(options):
    data = arithmetic_records(**options)
    reserved = {op: {tuple(p) for p in ps} for op, ps in data.info["heldout_pairs"].items()}
    for op in OPS:
        space = len(PairSpace(op, options.get("add_max", 20), options.get("mul_max", 9)))
        assert len(reserved[op]) == min(space // 2, round(options["heldout_pairs"] * space))
    for split in SPLIT_OPS:
        for rec in data.records[f"{split}_train"]:
            _, op, a, b, _ = parse_text(rec["text"])
            assert (a, b) not in reserved[op], rec
        for rec in data.records[f"{split}_eval_equation"]:
            op, a, b = eval_pair(rec)
            assert (a, b) in reserved[op], rec


def test_default_eval_equations_test_trained_facts():
    # Documented: without --heldout-pairs, eval equations are facts that training text holds.
    data = arithmetic_records()
    assert data.info["heldout_pairs"] == {}
    trained = {parse_text(r["text"])[1:4] for k in ("retain_train", "forget_train")
               for r in data.records[k]}
    for k in ("retain_eval_equation", "forget_eval_equation"):
        assert all(eval_pair(r) in trained for r in data.records[k])


@pytest.mark.parametrize("options, message", [
    ({"train_size": -1}, "--train-size"),
    ({"train_size": 0}, "--train-size"),
    ({"eval_size": -5}, "--eval-size"),
    ({"add_max": 0}, "--add-max"),
    ({"mul_max": 1}, "--mul-max"),
    ({"word_fraction": 1.5}, "--word-fraction"),
    ({"heldout_pairs": 0.6}, "--heldout-pairs"),
    ({"mul_max": 3}, "only 9 mul operand pairs"),
    ({"add_max": 2, "eval_size": 40}, "raise --add-max"),
    ({"heldout_pairs": 0.1, "eval_size": 60}, "reserves 8 of the 81 mul pairs"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_impossible_options_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        arithmetic_records(**options)


# ----------------------------------------------------------------------------- files, CLI


def test_generate_writes_identical_files_per_seed(tmp_path):
    a = generate_arithmetic(tmp_path / "a", seed=5, **SMALL)
    b = generate_arithmetic(tmp_path / "b", seed=5, **SMALL)
    c = generate_arithmetic(tmp_path / "c", seed=6, **SMALL)
    assert set(a) == set(FILES) | {"info"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    assert a["retain_train"].read_bytes() != c["retain_train"].read_bytes()
    assert json.loads(a["info"].read_text())["options"]["seed"] == 5


def test_files_read_back_with_the_record_reader(tmp_path):
    from undo_cli.records import file_shape, read_records

    paths = generate_arithmetic(tmp_path / "d", **SMALL)
    shapes = {key: file_shape(read_records(path)) for key, path in paths.items()
              if key != "info"}
    assert shapes == {key: "text" if key.endswith(("train", "text")) else "completion"
                      for key in FILES}
    for key, path in paths.items():
        path.read_bytes().decode("ascii")
        if key != "info":
            lines = path.read_text().splitlines()
            assert all(isinstance(json.loads(line), dict) for line in lines)


def test_cli_end_to_end(cli, tmp_path):
    out = tmp_path / "arith"
    result = cli("data", "arithmetic", out, "--train-size", 300, "--eval-size", 20,
                 "--seed", 7, "--word-fraction", 0.5, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["records"]["retain_train"] == 300 and summary["records"]["forget_eval"] == 20
    assert {p.name for p in out.iterdir()} == set(FILES.values()) | {INFO_NAME, "undo.json"}
    manifest = json.loads((out / "undo.json").read_text())
    assert manifest["stage"] == "data" and manifest["seed"] == 7
    assert manifest["arguments"]["word_fraction"] == 0.5
    expected = arithmetic_records(seed=7, train_size=300, eval_size=20, word_fraction=0.5)
    lines = (out / "forget_eval.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == expected.records["forget_eval"]

    again = cli("data", "arithmetic", out)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    replaced = cli("data", "arithmetic", out, "--overwrite", "--train-size", 10, "--eval-size",
                   4)
    assert replaced.exit_code == 0, replaced.stderr
    assert len((out / "retain_train.jsonl").read_text().splitlines()) == 10


@pytest.mark.parametrize("args", [
    ["--train-size", "-3"],
    ["--eval-size", "-1"],
    ["--add-max", "2", "--eval-size", "40"],
    ["--mul-max", "3"],
    ["--word-fraction", "2"],
    ["--heldout-pairs", "0.3"],
    ["--seed", "abc"],
])
def test_cli_bad_options_exit_2_with_one_line_and_no_output(cli, tmp_path, args):
    out = tmp_path / "sub" / "never"
    result = cli("data", "arithmetic", out, *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not out.parent.exists()
    assert result.stdout == ""


def test_data_group_lists_arithmetic(cli):
    result = cli("data", "--help")
    assert result.exit_code == 0 and "arithmetic" in result.stdout
    detail = cli("data", "arithmetic", "--help")
    for name in ("retain_train", "forget_eval", "info.json", "--heldout-pairs"):
        assert name in detail.stdout


def test_data_directory_is_usable_as_paths(tmp_path):
    paths = generate_arithmetic(tmp_path / "e", train_size=20, eval_size=4)
    assert all(isinstance(p, Path) and p.is_file() for p in paths.values())


def test_the_forget_halves_share_no_operand_pair():
    data = arithmetic_records(train_size=400, eval_size=80, seed=3)
    recs = data.records

    def pairs(texts):
        found = set()
        for t in texts:
            m = re.match(r"(\d+) ([*/]) (\d+) = ", t)
            if m:
                found.add((m.group(2), int(m.group(1)), int(m.group(3))))
        return found

    attack_train = pairs(r["text"] for r in recs["forget_attack_train"])
    attack_eval = pairs(r["prompt"] for r in recs["forget_attack_eval_equation"])
    heldout_eval = pairs(r["prompt"] for r in recs["forget_heldout_eval_equation"])
    assert attack_train and attack_eval and heldout_eval
    assert not heldout_eval & (attack_train | attack_eval)  # half B never in half A
    assert attack_eval <= pairs(r["text"] for r in recs["forget_train"])
    # Every forget eval equation is in exactly one half; the attack text is forget text.
    assert len(recs["forget_attack_eval_equation"]) + len(
        recs["forget_heldout_eval_equation"]) == len(recs["forget_eval_equation"])
    assert all(r in recs["forget_train"] for r in recs["forget_attack_train"])
    # Deterministic per seed (the halves come from a generator of their own).
    assert arithmetic_records(train_size=400, eval_size=80, seed=3).records == recs
