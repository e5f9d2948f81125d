"""`undo eval` on the command line: JSON on stdout only, the table on stderr, exit codes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import write_jsonl

from undo_cli.checkpoint import load_model, load_tokenizer
from undo_cli.evaluate import evaluate_model, load_eval_set
from undo_cli.evaluation import lm_eval_available


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    sums = []
    for _ in range(12):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        sums.append({"prompt": f"{a} + {b} = ", "answer": a + b})  # a number, not a string
    return {
        "text": write_jsonl(root / "text.jsonl", [{"text": f"{i} + {i} = {2 * i}"}
                                                  for i in range(15)]),
        "sums": write_jsonl(root / "sums.jsonl", sums),
        "mc": write_jsonl(root / "mc.jsonl", [
            {"question": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2), "no"], "answer": "A"}
            for i in range(6)]),
    }


def test_json_output_is_one_object_on_stdout(cli, tiny_llama, tiny_gpt2, files):
    result = cli("eval", tiny_llama, tiny_gpt2, "--data", f"retain={files['sums']}",
                 "--data", f"lm={files['text']}", "--data", f"mc={files['mc']}", "--json",
                 "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # nothing else on stdout
    assert [r["checkpoint"] for r in payload["results"]] == [str(tiny_llama), str(tiny_gpt2)]
    metrics = payload["results"][0]["metrics"]
    assert set(metrics) == {"retain", "lm", "mc"}
    assert set(metrics["retain"]) == {"loss", "loss_stderr", "accuracy", "accuracy_stderr",
                                      "accuracy_lower", "accuracy_upper", "tokens", "n"}
    assert set(metrics["lm"]) == {"loss", "loss_stderr", "ppl", "tokens", "n"}
    assert set(metrics["mc"]) == {"accuracy", "accuracy_stderr", "accuracy_lower",
                                  "accuracy_upper", "accuracy_norm", "accuracy_norm_stderr",
                                  "accuracy_norm_lower", "accuracy_norm_upper", "n"}
    mc = metrics["mc"]
    assert mc["accuracy_lower"] <= mc["accuracy"] <= mc["accuracy_upper"]
    assert metrics["retain"]["n"] == 12 and metrics["mc"]["n"] == 6

    # The same numbers as the library on the model in memory.
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    sets = [load_eval_set("retain", files["sums"], tok), load_eval_set("lm", files["text"], tok),
            load_eval_set("mc", files["mc"], tok)]
    direct = evaluate_model(model, tok, sets, max_new_tokens=4)
    for name, values in direct.items():
        for key, value in values.items():
            assert metrics[name][key] == pytest.approx(value, abs=1e-6)


def test_table_goes_to_stderr(cli, tiny_llama, files):
    result = cli("eval", tiny_llama, "--data", f"lm={files['text']}", "--data", str(files["mc"]))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "checkpoint" in result.stderr and "acc_norm" in result.stderr
    assert "ppl" in result.stderr and "mc" in result.stderr  # bare PATH: named by its stem


def test_quiet_prints_nothing_but_errors_and_keeps_the_gates(cli, tiny_llama, files):
    args = ("eval", tiny_llama, "--data", f"lm={files['text']}")
    loud = cli(*args, "--fail-if", "lm.loss < 0")
    assert loud.exit_code == 0 and "evaluating" in loud.stderr and "gate passed" in loud.stderr
    quiet = cli(*args, "--quiet", "--fail-if", "lm.loss < 0")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout == ""
    failed = cli(*args, "-q", "--fail-if", "lm.loss > 0")
    assert failed.exit_code == 3
    assert failed.stderr.startswith("error: ") and len(failed.stderr.splitlines()) == 1
    document = cli(*args, "--quiet", "--json")
    assert json.loads(document.stdout)["results"][0]["metrics"]["lm"]["loss"] > 0
    assert document.stderr == ""


def test_table_cells_carry_their_uncertainty():
    from undo_cli.cli.eval_cmd import cell

    metrics = {"accuracy": 0.86, "accuracy_lower": 0.7812, "accuracy_upper": 0.9234,
               "loss": 1.2345, "loss_stderr": 0.0512, "n": 50, "ppl": 3.4}
    assert cell("accuracy", metrics) == "0.8600 [0.78, 0.92]"
    assert cell("loss", metrics) == "1.2345 ±0.051"
    assert cell("ppl", metrics) == "3.4000"  # no bound of its own
    assert cell("n", metrics) == "50"
    assert cell("accuracy_norm", metrics) == ""


def test_limit(cli, tiny_llama, files):
    result = cli("eval", tiny_llama, "--data", f"s={files['sums']}", "--limit", "5", "--json",
                 "--batch-size", "2", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["metrics"]["s"]["n"] == 5


@pytest.mark.parametrize(("rows", "message"), [
    ([{"foo": 1}], "bad.jsonl:1: record has fields"),
    ([{"question": "q", "answer": 1}], "bad.jsonl:1: 'choices' is missing"),
    ([{"question": "q", "choices": ["a"], "answer": 0},
      {"question": "q", "choices": ["a", "b"], "answer": 5}], "bad.jsonl:2: 'answer' 5 is out"),
])
def test_bad_data_exits_2_naming_file_and_line(cli, tiny_llama, tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = cli("eval", tiny_llama, "--data", f"x={path}")
    assert result.exit_code == 2
    assert message in result.stderr and result.stdout == ""


def test_empty_file_exits_2(cli, tiny_llama, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    result = cli("eval", tiny_llama, "--data", f"x={path}")
    assert result.exit_code == 2 and f"{path}: the data set is empty" in result.stderr


def test_usage_errors_exit_2(cli, tiny_llama, tmp_path, files):
    assert cli("eval", tiny_llama).exit_code == 2  # no --data
    missing = cli("eval", tmp_path / "nope", "--data", f"s={files['sums']}")
    assert missing.exit_code == 2 and "checkpoint not found" in missing.stderr
    twice = cli("eval", tiny_llama, "--data", f"s={files['sums']}", "--data", f"s={files['text']}")
    assert twice.exit_code == 2 and "used twice" in twice.stderr
    fmt = cli("eval", tiny_llama, "--data", f"s={files['mc']}", "--choice-format", "nope")
    assert fmt.exit_code == 2 and "--choice-format" in fmt.stderr
    batch = cli("eval", tiny_llama, "--data", f"s={files['sums']}", "--batch-size", "0")
    assert batch.exit_code == 2


def test_a_corrupt_checkpoint_exits_2_naming_the_file(cli, tmp_path, tiny_llama, files):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    result = cli("eval", broken, "--data", f"s={files['sums']}")
    assert result.exit_code == 2
    assert f"{broken / 'model.safetensors'}: corrupt safetensors file" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.skipif(lm_eval_available(), reason="lm_eval is installed")
def test_lm_eval_tasks_without_lm_eval_say_how_to_install(cli, tiny_llama):
    result = cli("eval", tiny_llama, "--lm-eval-tasks", "wmdp_bio,mmlu")
    assert result.exit_code == 2
    assert "pip install 'lm_eval[hf]'" in result.stderr


def test_eval_takes_eval_like_the_training_commands_and_data_as_its_alias(cli, tiny_llama,
                                                                          files):
    by_eval = cli("eval", tiny_llama, "--eval", f"lm={files['text']}", "--json")
    by_data = cli("eval", tiny_llama, "--data", f"lm={files['text']}", "--json")
    assert by_eval.exit_code == 0 and by_data.exit_code == 0, by_eval.output + by_data.output
    assert json.loads(by_eval.stdout) == json.loads(by_data.stdout)
    assert set(json.loads(by_eval.stdout)["results"][0]["metrics"]) == {"lm"}
    shown = cli("eval", "--help").stdout
    assert "--eval" in shown and "--data is an alias" in shown
