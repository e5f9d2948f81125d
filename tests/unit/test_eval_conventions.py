"""lm-evaluation-harness's conventions without lm-eval (issue 20, points 4-6 and 8): the
context's trailing whitespace moves to the continuation, `--until` stop strings, the ARC
layout of `--choice-format qa`, and `--log-samples` of `eval` and `relearn-attack`."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import torch
from conftest import write_jsonl

from undo_cli.checkpoint import load_model, load_tokenizer
from undo_cli.data import build_stream, encode_prompt_completion, split_pair
from undo_cli.evaluate import choice_prompt, evaluate_model, load_eval_set
from undo_cli.generation import greedy_generate, stop_strings
from undo_cli.losses import IGNORE_INDEX

# ------------------------------------------------------------- whitespace (point 4)


def test_split_pair_moves_trailing_whitespace():
    assert split_pair("12 + 7 = ", "19") == ("12 + 7 =", " 19")
    assert split_pair("Answer:\n ", "nuts") == ("Answer:", "\n nuts")
    assert split_pair("Answer:", " nuts") == ("Answer:", " nuts")


def test_prompt_and_completion_tokenise_as_the_whole_text(gpt2_bpe, tmp_path):
    """On a BPE tokenizer `"12 + 7 = "` + `"19"` is the tokens of `"12 + 7 = 19"`: the answer
    is `" 19"` (one token, Ġ19), never a lone space and then `19`; training rows agree."""
    tok = load_tokenizer(gpt2_bpe)
    whole = tok("12 + 7 = 19")["input_ids"]
    ids, labels = encode_prompt_completion(tok, "12 + 7 = ", "19")
    assert ids == whole + [tok.eos_token_id]
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(answer[0]) == "\u012019"
    assert answer == [whole[-1], tok.eos_token_id]
    assert encode_prompt_completion(tok, "12 + 7 =", " 19") == (ids, labels)

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "12 + 7 = ", "completion": "19"}])
    batch = next(iter(build_stream(tok, [str(data)], 32, 1, 0, name="t")))
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row == ids
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert kept == answer


def test_scores_do_not_depend_on_where_the_space_sits(gpt2_bpe, tmp_path):
    """`prompt "... Answer: " + "nuts"` scores as `"... Answer:" + " nuts"` (once: loss 8.65
    against 1.08 on the same questions)."""
    model, tok = load_model(gpt2_bpe).eval(), load_tokenizer(gpt2_bpe)
    q = "Question: What do squirrels eat? Answer:"
    spaced = write_jsonl(tmp_path / "a.jsonl", [{"prompt": q + " ", "answer": "nuts"}] * 2)
    plain = write_jsonl(tmp_path / "b.jsonl", [{"prompt": q, "answer": " nuts"}] * 2)
    a, b = (evaluate_model(model, tok, [load_eval_set(n, p, tok)], max_new_tokens=3)[n]
            for n, p in (("a", spaced), ("b", plain)))
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["tokens"] == b["tokens"]
    assert a["accuracy"] == b["accuracy"]


# ------------------------------------------------------------- --until (point 5)


def test_stop_strings_read_escapes():
    assert stop_strings(None) == ("\n",)
    assert stop_strings(["\\n", "", "ab", "ab", "\\t"]) == ("\n", "ab", "\t")


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(tiny_llama).eval(), load_tokenizer(tiny_llama)


def _prompts(tok):
    return [tok(f"{a} + {b} =")["input_ids"] for a in range(6) for b in range(3)]


def test_until_cuts_at_the_first_stop_string(llama):
    model, tok = llama
    prompts = _prompts(tok)
    with torch.no_grad():
        raw = greedy_generate(model, tok, prompts, max_new_tokens=10, stop_at_newline=False)
        # the character most often generated after the first position: a stop string that
        # cuts some answers in the middle
        stop = Counter(c for r in raw for c in r[1:]).most_common(1)[0][0]
        other = Counter(c for r in raw for c in r[1:] if c != stop).most_common(1)[0][0]
        cut = greedy_generate(model, tok, prompts, max_new_tokens=10, until=[stop])
        both = greedy_generate(model, tok, prompts, max_new_tokens=10, until=[stop, other])
    assert cut == [r.split(stop)[0] for r in raw]
    assert any(c != r for c, r in zip(cut, raw))
    assert both == [r.split(stop)[0].split(other)[0] for r in raw]


def test_eval_until_option(cli, llama, tiny_llama, tmp_path):
    model, tok = llama
    rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(6) for b in range(3)]
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    with torch.no_grad():
        raw = greedy_generate(model, tok, _prompts(tok), max_new_tokens=10,
                              stop_at_newline=False)
    stop = Counter(c for r in raw for c in r[1:]).most_common(1)[0][0]
    log = tmp_path / "s.jsonl"
    ran = cli("eval", tiny_llama, "--data", f"g={data}", "--until", stop, "--max-new-tokens",
              "10", "--log-samples", log, "--json")
    assert ran.exit_code == 0, ran.output
    generated = [json.loads(line)["generated"] for line in log.read_text().splitlines()]
    assert generated == [r.split(stop)[0] for r in raw]


# ------------------------------------------------------------- qa is lm-eval's ARC layout (6)


def test_qa_keeps_the_question_as_given():
    """lm-eval's ARC: doc_to_text "Question: {{question}}\\nAnswer:", target_delimiter " "
    (a question ending in a space keeps it: 22-25 of 100 decisions moved when it was
    stripped)."""
    context, continuations = choice_prompt("What is 2 + 2? ", ["4", "5"], "qa")
    assert context == "Question: What is 2 + 2? \nAnswer:"
    assert continuations == [" 4", " 5"]
    assert choice_prompt(" Q ", ["x"], "raw") == (" Q ", ["x"])


# ------------------------------------------------------------- --log-samples (point 8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sets")
    return {
        "mc": write_jsonl(d / "mc.jsonl", [
            {"question": f"{a} + 1 = ", "choices": [str(a + 1), str(a + 2), "x"], "answer": 0}
            for a in range(5)]),
        "gen": write_jsonl(d / "gen.jsonl", [{"prompt": f"{a} + 1 = ", "answer": str(a + 1)}
                                             for a in range(4)]),
        "text": write_jsonl(d / "text.jsonl", [{"text": f"{a} + {a} = {2 * a}"}
                                               for a in range(3)]),
    }


def test_eval_log_samples_one_line_per_item(cli, tiny_llama, sets, tmp_path):
    log = tmp_path / "samples.jsonl"
    ran = cli("eval", tiny_llama, *[x for n, p in sets.items() for x in ("--data", f"{n}={p}")],
              "--log-samples", log, "--json")
    assert ran.exit_code == 0, ran.output
    metrics = json.loads(ran.stdout)["results"][0]["metrics"]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    by_set = defaultdict(list)
    for r in records:
        assert r["checkpoint"] == str(tiny_llama)
        by_set[r["set"]].append(r)
    assert {k: len(v) for k, v in by_set.items()} == {"mc": 5, "gen": 4, "text": 3}
    for r in by_set["mc"]:
        assert r["context"].startswith("Question: ") and r["context"].endswith(" \nAnswer:")
        assert len(r["loglikelihoods"]) == len(r["choices"]) == 3
        assert r["predicted"] == max(range(3), key=lambda k: (r["loglikelihoods"][k], -k))
        assert r["correct"] == (r["predicted"] == r["target"])
    assert sum(r["correct"] for r in by_set["mc"]) / 5 == metrics["mc"]["accuracy"]
    assert sum(r["correct"] for r in by_set["gen"]) / 4 == metrics["gen"]["accuracy"]
    assert all({"prompt", "target", "generated", "loglikelihood"} <= set(r)
               for r in by_set["gen"])
    nll = -sum(r["loglikelihood"] for r in by_set["text"])
    assert nll / sum(r["tokens"] for r in by_set["text"]) == pytest.approx(
        metrics["text"]["loss"])


def test_relearn_attack_log_samples_and_choice_format(cli, tiny_llama, sets, tmp_path):
    """samples.jsonl holds the unattacked model's items and each run's last evaluation;
    the eval sets are laid out by --choice-format as in `undo eval`."""
    out = tmp_path / "attack"
    ran = cli("relearn-attack", tiny_llama, "--data", sets["text"], "--eval",
              f"forget={sets['mc']}", "--eval", f"gen={sets['gen']}", "--lrs", "1e-3,1e-2",
              "--steps", "2", "--eval-every", "1", "--batch-size", "2", "--max-length", "32",
              "--choice-format", "letters", "--log-samples", "--out", out, "--no-plot", "-q")
    assert ran.exit_code == 0, ran.output
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    groups = defaultdict(list)
    for r in records:
        groups[(r["config"], r["seed"], r["step"], r["set"])].append(r)
    runs = {(run["config"], run["seed"]): run for run in results["runs"]}
    assert len(groups) == 2 * (1 + len(runs))  # (unattacked + each run's last step) x sets
    for (config, seed, step, name), items in groups.items():
        assert len(items) == {"forget": 5, "gen": 4}[name]
        values = (results["initial"] if config == "initial" else
                  next(e for e in runs[(config, seed)]["curve"] if e["step"] == step))
        assert sum(r["correct"] for r in items) / len(items) == values[f"{name}.accuracy"]
    first = groups[("initial", None, 0, "forget")][0]
    assert first["choices"] == [" A", " B", " C"]  # --choice-format letters

    log = tmp_path / "eval.jsonl"
    assert cli("eval", tiny_llama, "--data", f"forget={sets['mc']}", "--choice-format",
               "letters", "--log-samples", log).exit_code == 0
    again = [json.loads(line) for line in log.read_text().splitlines()]
    assert [x for r in again for x in r["loglikelihoods"]] == pytest.approx(
        [x for r in groups[("initial", None, 0, "forget")] for x in r["loglikelihoods"]],
        abs=1e-5)
