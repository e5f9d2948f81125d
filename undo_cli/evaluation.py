"""`undo eval` as a library function: checkpoints on data sets and lm-evaluation-harness
tasks, a reference model, and `--fail-if` gates on the results (`evaluate_and_gate`).

The metrics themselves are `undo_cli.evaluate`'s (a model in memory); this module loads the
checkpoints one at a time, bridges to lm-eval, and applies the gates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from undo_cli.errors import UndoError, UsageError
from undo_cli.evaluate import (
    DEFAULT_MAX_NEW_TOKENS,
    LM_EVAL_HINT,
    evaluate_model,
    flatten_metrics,
    tokenize_eval_data,
)
from undo_cli.generation import unwrap_model
from undo_cli.records import EvalData

# ----------------------------------------------------------------------------- lm-eval bridge


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness (`lm_eval`) can be imported."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_metrics(output: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """lm-eval's `simple_evaluate` output -> `{task: {metric: value}}`.

    `acc` becomes `accuracy`, `acc_norm` `accuracy_norm`; standard errors are dropped; a
    filter other than `none` is appended (`exact_match_strict-match`). Only the requested
    tasks (or groups) are kept when present, else every reported task.
    """
    table: dict[str, dict[str, Any]] = {}
    for part in ("results", "groups"):
        for task, values in (output.get(part) or {}).items():
            table.setdefault(task, {}).update(values)
    wanted = [t for t in tasks if t in table] or sorted(table)
    out: dict[str, dict[str, float]] = {}
    for task in wanted:
        metrics: dict[str, float] = {}
        for key, value in table[task].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            name = {"acc": "accuracy", "acc_norm": "accuracy_norm"}.get(metric, metric)
            if filt and filt != "none":
                name = f"{name}_{filt}"
            metrics[name] = float(value)
        out[task] = metrics
    return out


def run_lm_eval(model, tokenizer, tasks: Sequence[str], *, batch_size: int | None = None,
                limit: int | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness tasks on a model in memory; `{task: {metric: value}}`.

    Raises `UsageError` with installation instructions when `lm_eval` is not installed.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise UsageError(LM_EVAL_HINT) from e
    model = unwrap_model(model)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or 8)
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), limit=limit, random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except (KeyError, ValueError, OSError, ConnectionError) as e:
        raise UndoError(f"lm-eval could not run {','.join(tasks)}: {e} "
                        "(tasks download their data sets: set HF_HUB_OFFLINE=0 or cache them)"
                        ) from e
    finally:
        for module, training in modes.items():
            module.training = training
    if not output:
        raise UndoError("lm-eval returned no results")
    return lm_eval_metrics(output, tasks)


# ----------------------------------------------------------------------------- checkpoints


def evaluate_checkpoints(checkpoints: Sequence[str | Path], data: Sequence[EvalData], *,
                         batch_size: int | None = None,
                         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                         max_length: int | None = None, choice_format: str = "qa",
                         device: torch.device | str | None = None,
                         lm_eval_tasks: Sequence[str] = (), limit: int | None = None,
                         seed: int = 0, allow_pickle: bool = False,
                         trust_remote_code: bool = False,
                         on_start: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Load each checkpoint in turn and evaluate it on every data set (and lm-eval task).

    Returns `[{"checkpoint": path, "metrics": {name: {metric: value}}}, ...]`. Checkpoint
    paths are checked before any model is loaded (`UsageError`); a checkpoint that fails
    to load raises `UndoError`.
    """
    from undo_cli.checkpoint import inspect_checkpoint, load_model, load_tokenizer
    from undo_cli.runtime import pick_device

    for ckpt in checkpoints:
        inspect_checkpoint(ckpt, allow_pickle=allow_pickle)
    if lm_eval_tasks and not lm_eval_available():
        raise UsageError(LM_EVAL_HINT)
    target = pick_device(str(device) if device is not None else None)
    results = []
    for ckpt in checkpoints:
        if on_start is not None:
            on_start(str(ckpt))
        model = load_model(ckpt, device=target, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(ckpt, trust_remote_code=trust_remote_code)
        sets = [tokenize_eval_data(d, tokenizer, choice_format=choice_format) for d in data]
        metrics = evaluate_model(model, tokenizer, sets, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, max_length=max_length,
                                 device=target)
        if lm_eval_tasks:
            metrics.update(run_lm_eval(model, tokenizer, lm_eval_tasks, batch_size=batch_size,
                                       limit=limit, seed=seed))
        results.append({"checkpoint": str(ckpt), "metrics": metrics})
        del model
        if target.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------- undo eval


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def evaluate_and_gate(checkpoints: Sequence[str | Path], data: Sequence[EvalData], *,
                      reference: str | Path | None = None, fail_if: Sequence[str] = (),
                      tasks: Sequence[str] = (), on_start: Callable[[str], None] | None = None,
                      **options: Any) -> dict[str, Any]:
    """What `undo eval` prints: `{"results": [...], "reference": {...}?, "gates": [...]?}`.

    Gates are parsed and their names checked before any model is loaded; `reference` is
    evaluated once on the same sets (not again if it is one of `checkpoints`); its metrics are
    named `teacher.SET.METRIC` / `reference.SET.METRIC` in the gates. `options` go to
    `evaluate_checkpoints`. A gate that reads a NaN metric raises after the results are
    returned in `error` (the caller shows the results, then fails); failed gates are records
    with `failed: true` (raise with `undo_cli.gates.raise_failed_gates`).
    """
    from undo_cli.evaluate import expected_metrics
    from undo_cli.gates import (
        REFERENCE_PREFIXES,
        check_eval_gate_names,
        check_gates,
        eval_gate_values,
        parse_gates,
    )

    gates = parse_gates(fail_if)
    names = [d.name for d in data]
    clash = sorted(set(names) & set(tasks))
    if clash:
        raise UsageError(f"--data name(s) {clash} clash with --lm-eval-tasks; rename the set")
    if reference is not None:
        taken = sorted(set(names) & set(REFERENCE_PREFIXES))
        if taken:
            raise UsageError(f"--data name(s) {taken} are reserved for --reference metrics "
                             "in --fail-if; rename the set")
    check_eval_gate_names(gates, expected_metrics(data), tasks, reference is not None)
    to_load = list(checkpoints)
    reference_index = None
    if reference is not None:
        reference_index = next((i for i, c in enumerate(checkpoints)
                                if _same_path(c, reference)), None)
        if reference_index is None:  # evaluated once, last
            to_load.append(reference)
            reference_index = len(to_load) - 1
    results = evaluate_checkpoints(to_load, data, lm_eval_tasks=tasks, on_start=on_start,
                                   **options)
    payload: dict[str, Any] = {"results": results[:len(checkpoints)]}
    ref_metrics = None
    if reference_index is not None:
        ref_metrics = results[reference_index]["metrics"]
        payload["reference"] = {"checkpoint": str(reference), "metrics": ref_metrics,
                                "listed": reference_index < len(checkpoints)}
    records: list[dict[str, Any]] = []
    for result in payload["results"]:
        try:
            values = eval_gate_values(flatten_metrics(result["metrics"]),
                                      flatten_metrics(ref_metrics) if ref_metrics else None)
            records += check_gates(gates, values, checkpoint=result["checkpoint"])
        except UndoError as e:  # e.g. a NaN metric: show the results, then fail
            payload["error"] = (type(e)(f"{e} for {result['checkpoint']}")
                                if type(e) in (UndoError, UsageError) else e)
            return payload
    if gates:
        payload["gates"] = records
    return payload
