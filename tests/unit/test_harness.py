"""The lm-evaluation-harness bridge (`undo_cli.evaluation.harness`), and `undo eval` compared
with lm-eval itself on local tasks (skipped when lm_eval is not installed)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from undo_cli.errors import UsageError
from undo_cli.evaluation import (
    lm_eval_available,
    lm_eval_metrics,
    metric_name,
    resolve_tasks,
    run_tasks,
)
from undo_cli.stats import wilson_interval

needs_lm_eval = pytest.mark.skipif(not lm_eval_available(), reason="lm_eval is not installed")


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from undo_cli.checkpoint import load_model, load_tokenizer

    return load_model(tiny_llama), load_tokenizer(tiny_llama)


def test_lm_eval_missing_says_how_to_install(monkeypatch, llama):
    model, tok = llama
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'lm_eval\[hf\]'"):
        run_tasks(model, tok, ["wmdp_bio"])
    with pytest.raises(UsageError, match=r"pip install 'lm_eval\[hf\]'"):
        resolve_tasks(["wmdp_bio"])


def test_metric_names_are_names_gates_can_use():
    assert metric_name("acc") == "accuracy" and metric_name("acc_norm", "none") == "accuracy_norm"
    assert metric_name("exact_match", "strict-match") == "exact_match_strict_match"


def test_lm_eval_metrics_mapping():
    """`sample_len` becomes `n`, standard errors are kept, proportions get their Wilson
    interval; only the requested tasks are kept."""
    output = {
        "results": {
            "wmdp_bio": {"alias": "wmdp_bio", "sample_len": 40, "acc,none": 0.25,
                         "acc_stderr,none": 0.01},
            "mmlu_anatomy": {"acc,none": 0.3, "acc_norm,none": 0.31},
            "gsm8k": {"sample_len": 10, "exact_match,strict-match": 0.1,
                      "exact_match_stderr,strict-match": 0.0},
        },
        "groups": {"mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.02}},
    }
    got = lm_eval_metrics(output, ["wmdp_bio", "mmlu", "gsm8k"])
    lower, upper = wilson_interval(10, 40)
    assert got["wmdp_bio"] == {"accuracy": 0.25, "accuracy_stderr": 0.01, "n": 40,
                               "accuracy_lower": lower, "accuracy_upper": upper}
    assert got["mmlu"] == {"accuracy": 0.4, "accuracy_stderr": 0.02}  # a group: no n
    assert got["gsm8k"]["exact_match_strict_match"] == 0.1
    assert got["gsm8k"]["exact_match_strict_match_lower"] == wilson_interval(1, 10)[0]
    assert set(got) == {"wmdp_bio", "mmlu", "gsm8k"}


def test_run_tasks_wiring_with_a_stand_in(monkeypatch, llama):
    """The bridge hands the model in memory to lm-eval's HFLM and maps the scores back."""
    import types

    model, tok = llama
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["model"], calls["tokenizer"], calls["batch"] = pretrained, tokenizer, batch_size

    def simple_evaluate(model, tasks, limit, **seeds):
        calls["tasks"], calls["limit"] = tasks, limit
        print("lm-eval talking on stdout")  # held back: stdout is for --json only
        return {"results": {"wmdp_bio": {"acc,none": 0.5, "acc_stderr,none": 0.1}}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    model.train()
    assert run_tasks(model, tok, ["wmdp_bio"], limit=3) == {
        "wmdp_bio": {"accuracy": 0.5, "accuracy_stderr": 0.1}}
    assert model.training  # mode restored
    model.eval()
    assert calls == {"model": model, "tokenizer": tok, "batch": 8, "tasks": ["wmdp_bio"],
                     "limit": 3}


# ------------------------------------------------------------------ local tasks, real lm-eval


def _local_tasks(root: Path) -> dict[str, Path]:
    """A multiple-choice task in lm-eval's ARC layout (half its questions end in a space),
    one in the raw layout whose questions end in a space (lm-eval moves it to the choice),
    and a generation task, each on a local JSON Lines file (`dataset_path: json`): no network."""
    rng = random.Random(0)
    mc, raw, gen = [], [], []
    for i in range(24):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        choices = [str(a + b), str(a + b + 1), str(a * b), "nuts"]
        rng.shuffle(choices)
        space = " " if i % 2 else ""  # ARC keeps the question as given, its space too
        mc.append({"question": f"What is {a} + {b}?{space}", "choices": choices,
                   "answer": choices.index(str(a + b))})
        raw.append({"question": f"{a} + {b} = ", "choices": choices,
                    "answer": choices.index(str(a + b))})
        gen.append({"prompt": f"{a} + {b} =", "answer": str(a + b)})
    files = {name: write_jsonl(root / f"{name}.jsonl", rows)
             for name, rows in (("mc", mc), ("raw", raw), ("gen", gen))}
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n"
    (root / "tasks").mkdir()
    (root / "tasks" / "mc.yaml").write_text(
        f"task: local_mc\n{common}    test: {files['mc']}\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "tasks" / "raw.yaml").write_text(
        f"task: local_raw\n{common}    test: {files['raw']}\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "target_delimiter: \"\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (root / "tasks" / "gen.yaml").write_text(
        f"task: local_gen\n{common}    test: {files['gen']}\noutput_type: generate_until\n"
        "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return files


def _lm_eval_direct(model_dir: Path, include: Path, tasks: list[str]) -> dict:
    """lm-eval on its own: HFLM on the model read from disk, its simple_evaluate."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir),
              batch_size=4)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(include)))


@needs_lm_eval
@pytest.mark.parametrize("which", ["gpt2_bpe", pytest.param("tiny_llama", marks=pytest.mark.slow)])
def test_undo_eval_agrees_with_lm_eval_on_local_tasks(which, request, cli, tmp_path):
    """Per choice log-likelihoods within 1e-4 and the same accuracies, in the ARC and raw
    layouts (raw: questions ending in a space); the same greedy answers; and `undo eval
    --lm-eval-tasks` gives lm-eval's own numbers for the same tasks found by name."""
    model_dir = request.getfixturevalue(which)
    files = _local_tasks(tmp_path)
    include = tmp_path / "tasks"
    direct = _lm_eval_direct(model_dir, include, ["local_mc", "local_raw", "local_gen"])
    log = tmp_path / "samples.jsonl"
    ran = cli("eval", model_dir, "--data", f"mc={files['mc']}", "--data", f"gen={files['gen']}",
              "--max-new-tokens", "6", "--log-samples", log, "--json")
    assert ran.exit_code == 0, ran.output
    ran_raw = cli("eval", model_dir, "--data", f"raw={files['raw']}", "--choice-format", "raw",
                  "--log-samples", tmp_path / "raw-samples.jsonl", "--json")
    assert ran_raw.exit_code == 0, ran_raw.output
    ours = [json.loads(line) for p in (log, tmp_path / "raw-samples.jsonl")
            for line in p.read_text().splitlines()]
    theirs = {name: sorted(direct["samples"][task], key=lambda s: int(s["doc_id"]))
              for name, task in (("mc", "local_mc"), ("raw", "local_raw"), ("gen", "local_gen"))}
    for name in ("mc", "raw"):
        mine = [s for s in ours if s["set"] == name]
        assert len(mine) == len(theirs[name]) == 24
        for a, b in zip(mine, theirs[name]):
            assert a["choices"] == [arg[1] for arg in b["arguments"]]
            lm = [resp[0][0] for resp in b["resps"]]
            assert a["loglikelihoods"] == pytest.approx(lm, abs=1e-4)
        acc = sum(s["correct"] for s in mine) / 24
        assert acc == pytest.approx(direct["results"][f"local_{name}"]["acc,none"])
    mine = [s for s in ours if s["set"] == "gen"]
    assert [s["generated"] for s in mine] == [b["resps"][0][0] for b in theirs["gen"]]

    bridged = cli("eval", model_dir, "--lm-eval-tasks", "local_mc,local_raw",
                  "--lm-eval-include-path", include, "--fail-if", "local_mc.accuracy > 1",
                  "--json")
    assert bridged.exit_code == 0, bridged.output
    metrics = json.loads(bridged.stdout)["results"][0]["metrics"]
    for task in ("local_mc", "local_raw"):
        assert metrics[task]["accuracy"] == direct["results"][task]["acc,none"]
        assert metrics[task]["n"] == 24


GATE_CASES = [
    (["--lm-eval-tasks", "local_mc"], "unknown task 'local_mc'"),
    (["--lm-eval-tasks", "local_mc", "--lm-eval-include-path", "{root}/nope"],
     "not a directory"),
    (["--lm-eval-tasks", "local_mc", "--lm-eval-include-path", "{root}/tasks", "--fail-if",
      "local_mc.exact_match > 0"], "unknown name 'local_mc.exact_match'"),
    pytest.param(["--lm-eval-tasks", "{root}/tasks/gen.yaml", "--fail-if",
                  "local_gen.accuracy > 0"], "did you mean 'local_gen.exact_match'",
                 marks=pytest.mark.slow),
]


@needs_lm_eval
@pytest.mark.parametrize(("args", "message"), GATE_CASES)
def test_bridged_tasks_are_resolved_before_any_model_loads(args, message, cli, tmp_path,
                                                           monkeypatch):
    """An unknown task, a missing include path and a gate on a metric the task does not give
    fail with exit 2 naming the problem (no HF_HUB_OFFLINE hint for a local task), before any
    checkpoint is loaded."""
    import undo_cli.checkpoint as checkpoint

    files = _local_tasks(tmp_path)
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    args = [a.format(root=tmp_path) for a in args]
    result = cli("eval", tmp_path / "no-such-model", "--data", f"mc={files['mc']}", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "HF_HUB_OFFLINE" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # lm-eval's own noise held back


# ------------------------------------------------------------------ task YAML errors, one line


def _stand_in_lm_eval(monkeypatch, error: BaseException) -> None:
    """An lm_eval whose TaskManager fails to build any task with `error`, as lm-eval 0.4
    does for a malformed task YAML (`TaskConfig(**config)` raising TypeError, ...)."""
    import importlib.machinery
    import types

    class TaskManager:
        def __init__(self, include_path=None):
            self.all_tasks = ["my_task"] if include_path else []  # the include path's

        def load(self, specs):
            raise error

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = TaskManager
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = object
    for name, module in (("lm_eval", lm_eval), ("lm_eval.tasks", tasks),
                         ("lm_eval.models", types.ModuleType("lm_eval.models")),
                         ("lm_eval.models.huggingface", huggingface)):
        monkeypatch.setitem(sys.modules, name, module)


BAD_TASK = ("task: my_task\ndataset_path: json\noutput_type: multiple_choice\n"
            "doc_to_text: \"{{question}}\"\nmetric_lst:\n  - metric: acc\n")


def test_an_unknown_task_field_is_named_with_its_file_and_line(monkeypatch, tmp_path, cli,
                                                               tiny_llama):
    from undo_cli.errors import DataError

    task = tmp_path / "bad.yaml"
    task.write_text(BAD_TASK)
    _stand_in_lm_eval(monkeypatch, TypeError(
        "TaskConfig.__init__() got an unexpected keyword argument 'metric_lst'"))
    with pytest.raises(DataError) as caught:
        resolve_tasks([str(task)])
    assert str(caught.value) == (f"{task}:5: lm-eval task: field 'metric_lst' is not a field "
                                 "lm-eval tasks have (did you mean metric_list?)")
    # the same through `undo eval`, by name under an include path: exit 2, one line
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text(BAD_TASK)
    result = cli("eval", tiny_llama, "--lm-eval-tasks", "my_task", "--lm-eval-include-path",
                 tmp_path / "tasks")
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: {tmp_path / 'tasks' / 'mine.yaml'}:5: lm-eval task: "
                             "field 'metric_lst' is not a field lm-eval tasks have (did you "
                             "mean metric_list?)\n")


def test_task_yaml_errors_translate_to_one_line(tmp_path):
    import yaml

    from undo_cli.evaluation.task_errors import task_error

    task = tmp_path / "t.yaml"
    task.write_text("task: t\ndataset_path: json\nmetric_list:\n  - metric acc: [\n")
    try:
        yaml.safe_load(task.open())
    except yaml.YAMLError as e:
        syntax = task_error(e, [str(task)])
    assert str(syntax).startswith(f"{task}:") and "not valid YAML" in str(syntax)
    assert "\n" not in str(syntax)
    task.write_text("task: t\ndataset_path: json\nmetric_list:\n  - acc: 1\n")
    missing = task_error(KeyError("metric"), [str(task)])
    assert str(missing) == (f"{task}: lm-eval task: lm-eval needs the field 'metric' here, and "
                            "the task does not set it (or misspells it)")
    wrong = task_error(TypeError("'int' object is not iterable in doc_to_choice"),
                       [str(task)])
    assert wrong is not None and str(wrong).startswith(f"{task}: lm-eval task:")
    task.write_text("task: t\ndoc_to_choice: 3\n")
    typed = task_error(TypeError("'int' object is not iterable in doc_to_choice"),
                       [str(task)])
    assert str(typed).startswith(f"{task}:2: lm-eval task: field 'doc_to_choice' has a value")
    assert task_error(ConnectionError("offline"), ["wmdp_bio"]) is None
