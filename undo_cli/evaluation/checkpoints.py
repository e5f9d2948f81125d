"""`undo eval` as a library function: checkpoints on data sets and lm-evaluation-harness
tasks, a reference model, and `--fail-if` gates on the results (`evaluate_and_gate`).

The metrics themselves are `undo_cli.evaluate`'s (a model in memory) and lm-eval's
(`undo_cli.evaluation.harness`); this module loads the checkpoints one at a time and applies
the gates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import undo_cli.checkpoint as checkpoint_io  # load_model looked up when called (tests replace it)
from undo_cli.checkpoint import atomic_file, inspect_checkpoint, load_tokenizer
from undo_cli.errors import UndoError, UsageError
from undo_cli.evaluate import (
    DEFAULT_MAX_NEW_TOKENS,
    evaluate_model,
    expected_metrics,
    flatten_metrics,
    tokenize_eval_data,
)
from undo_cli.evaluation.harness import ResolvedTasks, resolve_tasks, run_tasks
from undo_cli.gates import (
    REFERENCE_PREFIXES,
    check_eval_gate_names,
    check_gates,
    eval_gate_values,
)
from undo_cli.jsontext import to_json
from undo_cli.options.text import Condition
from undo_cli.records import EvalData
from undo_cli.runtime import pick_device

# What `--log-samples` gets: (checkpoint, set or task, its per-item records).
OnSamples = Callable[[str, str, list], None]

# ----------------------------------------------------------------------------- checkpoints


def evaluate_checkpoints(checkpoints: Sequence[str | Path], data: Sequence[EvalData], *,
                         batch_size: int | None = None,
                         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                         max_length: int | None = None, choice_format: str = "qa",
                         device: torch.device | str | None = None,
                         lm_eval_tasks: Sequence[str] | ResolvedTasks = (),
                         limit: int | None = None, seed: int = 0, allow_pickle: bool = False,
                         trust_remote_code: bool = False, base_model: str | Path | None = None,
                         until: Sequence[str] | None = None,
                         target_delimiter: str | None = None,
                         on_samples: OnSamples | None = None, quiet_lm_eval: bool = True,
                         on_start: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Load each checkpoint in turn and evaluate it on every data set (and lm-eval task).

    Returns `[{"checkpoint": path, "metrics": {name: {metric: value}}}, ...]`. Checkpoint
    paths (and lm-eval tasks given by name: `resolve_tasks`) are checked before any model is
    loaded (`UsageError`); a checkpoint that fails to load raises `UndoError`.
    `on_samples(checkpoint, set, records)` gets every item's record (`--log-samples`).
    """

    for ckpt in checkpoints:
        inspect_checkpoint(ckpt, allow_pickle=allow_pickle, base_model=base_model)
    if lm_eval_tasks and not isinstance(lm_eval_tasks, ResolvedTasks):
        lm_eval_tasks = resolve_tasks(lm_eval_tasks, quiet=quiet_lm_eval)
    target = pick_device(str(device) if device is not None else None)
    results = []
    for ckpt in checkpoints:
        if on_start is not None:
            on_start(str(ckpt))
        model = checkpoint_io.load_model(ckpt, device=target, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, base_model=base_model)
        tokenizer = load_tokenizer(ckpt, trust_remote_code=trust_remote_code,
                                   base_model=base_model)
        sets = [tokenize_eval_data(d, tokenizer, choice_format=choice_format,
                                   target_delimiter=target_delimiter) for d in data]
        samples: dict[str, list] | None = {} if on_samples is not None else None
        metrics = evaluate_model(model, tokenizer, sets, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, max_length=max_length,
                                 device=target, until=until, samples=samples)
        if lm_eval_tasks:
            metrics.update(run_tasks(model, tokenizer, lm_eval_tasks, batch_size=batch_size,
                                     limit=limit, seed=seed, samples=samples,
                                     quiet=quiet_lm_eval))
        if on_samples is not None:
            for name, records in samples.items():
                on_samples(str(ckpt), name, records)
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
                      reference: str | Path | None = None, fail_if: Sequence[Condition] = (),
                      tasks: Sequence[str] = (), include_path: Sequence[str | Path] = (),
                      on_start: Callable[[str], None] | None = None,
                      **options: Any) -> dict[str, Any]:
    """What `undo eval` prints: `{"results": [...], "reference": {...}?, "gates": [...]?}`.

    lm-eval `tasks` (looked up in lm-eval's registry and `include_path`) are resolved and
    built first; the `fail_if` gates (`GateOptions.fail_if`: parsed when the group was built)
    have their names checked before any model is loaded (`TASK.METRIC` names too, once the
    tasks are built); `reference` is evaluated once on the same sets (not again if it is one
    of `checkpoints`); its metrics are named `teacher.SET.METRIC` / `reference.SET.METRIC` in
    the gates. `options` go to
    `evaluate_checkpoints`. A gate that reads a NaN metric raises after the results are
    returned in `error` (the caller shows the results, then fails); failed gates are records
    with `failed: true` (raise with `undo_cli.gates.raise_failed_gates`).
    """

    gates = [condition.expr for condition in fail_if]
    names = [d.name for d in data]
    if reference is not None:
        taken = sorted(set(names) & set(REFERENCE_PREFIXES))
        if taken:
            raise UsageError(f"--data name(s) {taken} are reserved for --reference metrics "
                             "in --fail-if; rename the set")
    resolved = None
    if not tasks:
        check_eval_gate_names(gates, expected_metrics(data), (), reference is not None)
    else:
        resolved = resolve_tasks(tasks, include_path,
                                 quiet=options.get("quiet_lm_eval", True))
        clash = sorted(set(names) & set(resolved.names.values()))
        if clash:
            raise UsageError(f"--data name(s) {clash} clash with --lm-eval-tasks; rename the "
                             "set")
        check_eval_gate_names(gates, [*expected_metrics(data), *resolved.expected_metrics()],
                              resolved.open_tasks(), reference is not None)
    to_load = list(checkpoints)
    reference_index = None
    if reference is not None:
        reference_index = next((i for i, c in enumerate(checkpoints)
                                if _same_path(c, reference)), None)
        if reference_index is None:  # evaluated once, last
            to_load.append(reference)
            reference_index = len(to_load) - 1
    results = evaluate_checkpoints(to_load, data, lm_eval_tasks=resolved or (),
                                   on_start=on_start, **options)
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


def write_samples(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """`--log-samples FILE`: the records as JSON Lines, written through `atomic_file` (an
    interrupted write leaves FILE as it was)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(to_json(record) + "\n")
