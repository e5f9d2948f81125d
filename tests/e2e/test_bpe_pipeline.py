"""The arithmetic pipeline (examples/arithmetic.sh's stages, smoke budgets) on a GPT-2 with a
byte-level BPE tokenizer built locally, and what lm-evaluation-harness's whitespace
convention means for such a model (issue 20, point 4).

With a BPE tokenizer `"12 + 7 = 19"` is read `12`, ` +`, ` 7`, ` =`, ` 19`: the space
belongs to the answer's token. `undo data arithmetic` writes prompts that end in a space
(`"12 + 7 = "`); tokenised apart, prompt and answer would give `... ' =', ' '` then `19`, a
sequence the model never saw. Scoring, generation and training all move the space to the
answer instead."""

from __future__ import annotations

import json

import pytest
from conftest import build_bpe_tokenizer, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer"
    build_bpe_tokenizer().save_pretrained(path)
    return path


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_arithmetic_pipeline_with_a_bpe_tokenizer(cli, bpe_dir, tmp_path):
    """data -> train base and oracle -> unlearn -> perturb -> distill -> attacks -> report,
    as the demo runs them (SMOKE budgets), from a GPT-2 preset with the BPE tokenizer."""
    from undo_cli.checkpoint import load_tokenizer
    from undo_cli.evaluate import load_eval_set

    out, d = tmp_path / "run", tmp_path / "run" / "data"
    _ok(cli("data", "arithmetic", d, "--seed", "0", "--train-size", "200", "--eval-size", "8"))
    evals = ["--eval", f"retain={d / 'retain_eval_equation.jsonl'}",
             "--eval", f"forget={d / 'forget_eval_equation.jsonl'}"]
    run = ["--batch-size", "4", "--max-length", "32", "--seed", "0", "-q"]
    retain, forget = d / "retain_train.jsonl", d / "forget_train.jsonl"
    preset = ["--init", "tiny", "--arch", "gpt2", "--tokenizer", bpe_dir]
    _ok(cli("train", out / "base", *preset, "--data", retain, "--data", forget,
            "--max-steps", "10", "--lr", "3e-3", *run))
    _ok(cli("train", out / "oracle", *preset, "--data", retain, "--max-steps", "10",
            "--lr", "3e-3", *run))
    _ok(cli("unlearn", out / "base", out / "unlearned", "--method", "maxent", "--forget", forget,
            "--retain", retain, "--max-steps", "3", "--lr", "1e-3", *run))
    _ok(cli("perturb", out / "unlearned", out / "perturbed", "--alpha", "0.6", "--beta", "0.1",
            "-q"))
    _ok(cli("distill", out / "undo", "--teacher", out / "unlearned", "--student",
            out / "perturbed", "--data", retain, *evals, "--stop-when",
            "retain.accuracy >= teacher - 0.05", "--eval-every", "2", "--max-steps", "4",
            "--lr", "3e-3", *run))
    report = []
    for model in ("base", "unlearned", "undo", "oracle"):
        _ok(cli("relearn-attack", out / model, "--data", forget, *evals, "--forget-metric",
                "forget.accuracy", "--lrs", "1e-3", "--steps", "2", "--eval-every", "2",
                "--batch-size", "4", "--max-length", "32", "--out", out / "attacks" / model,
                "--no-plot", "-q"))
        report.append(f"{model}={out / 'attacks' / model}")
    _ok(cli("report", *report, "--out", out / "report"))
    rows = json.loads((out / "report" / "report.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["base", "unlearned", "undo", "oracle"]

    size = len(build_bpe_tokenizer())
    for name in ("base", "oracle", "unlearned", "perturbed", "undo"):
        assert len(AutoTokenizer.from_pretrained(out / name)) == size
        assert AutoModelForCausalLM.from_pretrained(out / name).config.model_type == "gpt2"
    # every answer is scored (and generated) as the word the model read in training
    tok = load_tokenizer(out / "undo")
    es = load_eval_set("forget", d / "forget_eval_equation.jsonl", tok)
    for seq, start, answer in zip(es.sequences, es.starts, es.answers):
        first = tok.convert_ids_to_tokens(seq[start])
        assert first.startswith("\u0120"), (answer, first)  # Ġ: the space is the answer's
        assert tok.decode(seq[start:-1]) == " " + answer


def test_a_bpe_model_trained_on_text_answers_prompts_ending_in_a_space(cli, bpe_dir, tmp_path):
    """Trained on `{"text": "a + b = c"}` until memorised, the model answers `{"prompt":
    "a + b = ", "answer": "c"}` (accuracy 0 when the prompt keeps its space); trained on
    the same pairs as prompt/completion records, it reads the text form as it learnt it."""
    pairs = [(a, b) for a in (3, 12, 21, 30) for b in (4, 7)]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"{a} + {b} = {a + b}"}
                                                  for a, b in pairs])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"{a} + {b} = ", "answer": str(a + b)}
                                             for a, b in pairs])
    common = ["--init", "tiny", "--arch", "gpt2", "--tokenizer", bpe_dir, "--max-steps", "300",
              "--lr", "5e-3", "--schedule", "constant", "--warmup-steps", "5", "--batch-size",
              "8", "--max-length", "16", "--packing", "none", "--eval", f"qa={qa}", "--json",
              "-q"]
    on_text = json.loads(_ok(cli("train", tmp_path / "t", "--data", text, *common)).stdout)
    assert on_text["metrics"]["qa.accuracy"] == 1.0
    on_pairs = json.loads(_ok(cli("train", tmp_path / "p", "--data", qa, *common)).stdout)
    assert on_pairs["metrics"]["qa.accuracy"] == 1.0
    assert on_pairs["metrics"]["qa.loss"] < 0.1
