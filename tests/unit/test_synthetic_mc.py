"""The WMDP-shaped multiple-choice task (`undo data facts`): layout, determinism, what the
corpus covers, and that `undo eval` scores its questions."""

from __future__ import annotations

import json
import re

import pytest

from undo_cli.errors import UsageError
from undo_cli.evaluate import choice_prompt
from undo_cli.synthetic_files import INFO_NAME
from undo_cli.synthetic_mc import (
    FILES,
    LETTERS,
    RELATIONS,
    SPLITS,
    facts_records,
    generate_facts,
)

SMALL = {"entities": 6, "train_size": 400}


def test_same_seed_gives_identical_records_and_other_seeds_differ():
    assert facts_records(seed=3, **SMALL).records == facts_records(seed=3, **SMALL).records
    assert facts_records(seed=3, **SMALL).records != facts_records(seed=4, **SMALL).records


def test_questions_have_the_wmdp_layout_and_are_right():
    data = facts_records(**SMALL)
    for split, domain in SPLITS.items():
        facts = {(f["subject"], f["relation"]): f["value"] for f in data.info["facts"][split]}
        questions = data.records[f"{split}_mc"]
        assert len(questions) == len(facts) == SMALL["entities"] * 4
        for q in questions:
            assert set(q) == {"question", "choices", "answer", "subject", "relation"}
            assert len(q["choices"]) == 4 == len(set(q["choices"]))
            assert isinstance(q["answer"], int) and 0 <= q["answer"] < 4
            assert q["choices"][q["answer"]] == facts[(q["subject"], q["relation"])]
            values = RELATIONS[domain][q["relation"]][0]
            assert set(q["choices"]) <= set(values)  # distractors: the same property
            assert q["subject"] in q["question"]
        # Answers spread over the four positions.
        assert len({q["answer"] for q in questions}) == 4


def test_the_corpus_states_every_fact_in_every_form_in_the_eval_prompts_text():
    data = facts_records(entities=5, train_size=600, qa_fraction=0.3, mc_fraction=0.3)
    for split in SPLITS:
        texts = [r["text"] for r in data.records[f"{split}_corpus"]]
        assert len(texts) == 600
        qa = [t for t in texts if t.startswith("Question: ")]
        mc = [t for t in texts if re.search(r"\nA\. .*\nAnswer: [ABCD]$", t, re.S)]
        assert len(qa) == 180 and len(mc) == 180
        for q in data.records[f"{split}_mc"]:
            value = q["choices"][q["answer"]]
            # `undo eval --choice-format qa` scores exactly a corpus line's text.
            context, continuations = choice_prompt(q["question"], q["choices"], "qa")
            assert context + continuations[q["answer"]] in texts
            # The letters layout too, but never with the evaluation's choice order.
            letters, _ = choice_prompt(q["question"], q["choices"], "letters")
            assert not any(t.startswith(letters) for t in mc)
            asked = [t for t in mc if t.startswith(q["question"] + "\n")]
            assert asked
            for t in asked:  # the letter answers the listed choice that is right
                listed = [line[3:] for line in t.splitlines()[1:5]]
                assert listed[LETTERS.index(t[-1])] == value
            assert any(q["subject"] in t and value in t and not t.startswith("Question")
                       and "\nA. " not in t for t in texts)  # a plain statement


def test_domains_use_distinct_names_and_no_name_prefixes_another():
    data = facts_records(entities=40, train_size=40 * 4)
    names = [f["subject"].lower() for split in SPLITS for f in data.info["facts"][split]]
    unique = sorted(set(names))
    assert len(unique) == 80
    for a in unique:
        assert not any(b != a and b.startswith(a) for b in unique)


@pytest.mark.parametrize(("options", "message"), [
    ({"entities": 0}, "--entities"),
    ({"entities": 10, "train_size": 30}, "below the 40 facts"),
    ({"qa_fraction": 1.5}, "--qa-fraction"),
    ({"qa_fraction": 0.6, "mc_fraction": 0.6}, "at most 1"),
    ({"colour": 1}, "facts data"),
])
def test_impossible_options_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        facts_records(**options)


def test_generate_writes_identical_files_per_seed(tmp_path):
    a = generate_facts(tmp_path / "a", seed=5, **SMALL)
    b = generate_facts(tmp_path / "b", seed=5, **SMALL)
    assert set(a) == set(FILES) | {"info"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
        a[key].read_bytes().decode("ascii")


def test_cli_end_to_end_and_undo_eval_scores_the_questions(cli, tmp_path, tiny_llama):
    out = tmp_path / "facts"
    result = cli("data", "facts", out, "--entities", 3, "--train-size", 60, "--seed", 2,
                 "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["records"]["forget_mc"] == 12 and summary["records"]["retain_corpus"] == 60
    assert {p.name for p in out.iterdir()} == set(FILES.values()) | {INFO_NAME, "undo.json"}
    manifest = json.loads((out / "undo.json").read_text())
    assert manifest["stage"] == "data" and manifest["arguments"]["task"] == "facts"
    bad = cli("data", "facts", tmp_path / "never", "--mc-fraction", 2)
    assert bad.exit_code == 2 and not (tmp_path / "never").exists()
    for fmt in ("qa", "letters"):
        scored = cli("eval", tiny_llama, "--data", f"forget={out / 'forget_mc.jsonl'}",
                     "--data", f"retain={out / 'retain_mc.jsonl'}", "--choice-format", fmt,
                     "--json")
        assert scored.exit_code == 0, scored.stderr
        metrics = json.loads(scored.stdout)["results"][0]["metrics"]
        assert metrics["forget"]["n"] == 12 and 0 <= metrics["retain"]["accuracy"] <= 1
    assert "facts" in cli("data", "--help").stdout
