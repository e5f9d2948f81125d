"""The bridge to lm-evaluation-harness (`undo eval --lm-eval-tasks`): lm-eval's own tasks, or
local ones (`--lm-eval-include-path DIR`, or a task's YAML file), run on the model in memory.

- `resolve_tasks` runs before any model is loaded: every task name is looked up in lm-eval's
  registry (and the include paths), every task is built (its data set loaded: a hub data set
  needs the network or the cache, a local one neither), and the metric names each will give
  are known, so that `--fail-if` names are checked up front.
- `run_tasks` hands the model in memory to lm-eval's `HFLM` and maps the scores back
  (`lm_eval_metrics`): `acc` -> `accuracy`, `acc_norm` -> `accuracy_norm`, a filter other
  than `none` appended (`exact_match_strict_match`), `sample_len` -> `n`, standard errors
  kept (`_stderr`), 95% Wilson intervals added for proportions, as `undo eval` gives its own
  metrics. Names are made of letters, digits and `_`, so that gates can name them.
- lm-eval's own output (its logs, warnings, progress bars, prints) is held back: stdout
  stays a clean `--json` document; with `quiet=False` it is let through.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.errors import UndoError, UsageError
from undo_cli.evaluate import LM_EVAL_HINT
from undo_cli.generation import unwrap_model
from undo_cli.stats import wilson_interval

_RENAMED = {"acc": "accuracy", "acc_norm": "accuracy_norm"}
_PROPORTIONS = ("accuracy", "accuracy_norm", "exact_match")  # means of 0/1 items
_NETWORK_WORDS = ("offline", "connection", "couldn't reach", "could not reach", "hub",
                  "network", "resolve", "urlopen", "max retries")


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness (`lm_eval`) can be imported."""
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def gate_name(name: str) -> str:
    """`name` with every character but letters, digits and `_` replaced by `_` (the names
    `--fail-if` expressions can use)."""
    return re.sub(r"\W", "_", name, flags=re.ASCII)


def metric_name(metric: str, filter_name: str = "none") -> str:
    """lm-eval's `metric,filter` as undo names it: `acc,none` -> `accuracy`,
    `exact_match,strict-match` -> `exact_match_strict_match`."""
    name = _RENAMED.get(metric, metric)
    if filter_name and filter_name != "none":
        name = f"{name}_{filter_name}"
    return gate_name(name)


@dataclass
class ResolvedTasks:
    """lm-eval tasks found and built before any model is loaded (`resolve_tasks`)."""

    specs: list[str]  # as given: names, or YAML files
    names: dict[str, str]  # spec -> its task or group name (undo's spelling: `gate_name`)
    metrics: dict[str, list[str] | None] = field(default_factory=dict)  # None: unknown yet
    manager: Any = None  # lm-eval's TaskManager
    include_path: list[Path] = field(default_factory=list)  # --lm-eval-include-path

    def expected_metrics(self) -> list[str]:
        """`TASK.METRIC` names the tasks will give (as `evaluate.expected_metrics`)."""
        return [f"{task}.{m}" for task, names in self.metrics.items() for m in names or ()]

    def open_tasks(self) -> list[str]:
        """Tasks (groups) whose metric names are known only once they ran."""
        return [task for task, names in self.metrics.items() if names is None]


@contextlib.contextmanager
def quiet_lm_eval(quiet: bool = True) -> Iterator[None]:
    """Hold back what lm-eval and the libraries it drives print: its loggers are raised to
    ERROR and stdout/stderr (prints, progress bars, warnings) are captured."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), \
                _descriptors_silenced():
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _descriptors_silenced() -> Iterator[None]:
    """File descriptors 1 and 2 pointed at a scratch file: what subprocesses lm-eval starts
    (`git describe` for its version record) print goes there, not into `--json` or the
    terminal."""
    import os
    import sys
    import tempfile

    for stream in (sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise UsageError(LM_EVAL_HINT) from e
    return lm_eval, HFLM


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def _task_metrics(task: Any) -> list[str]:
    """undo's names of the metrics a built lm-eval task reports (every metric under every
    filter, with their `_stderr`, and Wilson bounds for proportions), plus `n`."""
    metrics = list(getattr(task, "_metric_fn_list", {}) or {})
    if not metrics:
        metrics = [m["metric"] for m in (task.config.metric_list or []) if "metric" in m]
    filters = [getattr(f, "name", "none") for f in getattr(task, "_filters", [])] or ["none"]
    names = []
    for f in filters:
        for m in metrics:
            name = metric_name(str(m), f)
            names += [name, f"{name}_stderr"]
            if name.startswith(_PROPORTIONS):
                names += [f"{name}_lower", f"{name}_upper"]
    return [*names, "n"]


def _build_error(error: BaseException, specs: Sequence[str],
                 include_path: Sequence[str | Path] = ()) -> UndoError:
    """lm-eval's failure to build or run `specs` as one line: a task YAML's mistake naming
    the file, line and field (`task_errors`), else what lm-eval said (a network hint)."""
    from undo_cli.evaluation.task_errors import task_error

    translated = task_error(error, specs, include_path)
    if translated is not None:
        return translated
    text = " ".join(str(error).split())
    hint = ""
    if any(word in text.lower() for word in _NETWORK_WORDS):
        hint = (" (its data set comes from the Hugging Face Hub: run with HF_HUB_OFFLINE=0 "
                "once to cache it)")
    return UndoError(f"lm-eval could not load {', '.join(specs)}: {text[:300]}{hint}")


def resolve_tasks(specs: Sequence[str], include_path: Sequence[str | Path] = (), *,
                  quiet: bool = True) -> ResolvedTasks:
    """Find and build lm-eval tasks `specs` (registry names, names under `include_path`, or
    YAML files) before any model is loaded; `UsageError` for a task that does not exist,
    naming where it was looked for; `UndoError` for one whose data set cannot be loaded."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [Path(p) for p in include_path]
    for p in paths:
        if not p.is_dir():
            raise UsageError(f"--lm-eval-include-path {p}: not a directory (give the directory "
                             "holding your task YAML files)")
    specs = list(specs)
    try:
        with quiet_lm_eval(quiet):
            manager = TaskManager(include_path=[str(p) for p in paths] or None)
    except Exception as e:  # noqa: BLE001 - a malformed YAML under an include path
        raise _build_error(e, specs, paths) from e
    known = set(manager.all_tasks)
    for spec in specs:
        if spec in known:
            continue
        if _is_yaml(spec):
            if not Path(spec).is_file():
                raise UsageError(f"--lm-eval-tasks {spec}: no such YAML file")
            continue
        where = (f"lm-evaluation-harness's tasks or --lm-eval-include-path "
                 f"{', '.join(map(str, paths))}" if paths else
                 "lm-evaluation-harness's tasks (a task of your own: give its directory with "
                 "--lm-eval-include-path DIR, or its YAML file)")
        close = [t for t in sorted(known) if spec.lower() in t.lower()][:3]
        raise UsageError(f"--lm-eval-tasks: unknown task {spec!r}: not among {where}"
                         + (f"; similar: {', '.join(close)}" if close else ""))
    try:
        with quiet_lm_eval(quiet):
            loaded = manager.load(specs)
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many types
        raise _build_error(e, specs, paths) from e
    tasks, groups = loaded.get("tasks", {}), loaded.get("groups", {})
    names: dict[str, str] = {}
    for spec in specs:
        if spec in known:
            names[spec] = gate_name(spec)
        else:  # a YAML file: the task (or group) it defines
            defined = [n for n in [*groups, *tasks] if n not in names.values()]
            names[spec] = gate_name(defined[0]) if defined else gate_name(Path(spec).stem)
    metrics: dict[str, list[str] | None] = {}
    for spec, name in names.items():
        task = tasks.get(spec) or next((t for n, t in tasks.items() if gate_name(n) == name),
                                        None)
        metrics[name] = _task_metrics(task) if task is not None else None
    return ResolvedTasks(specs=specs, names=names, metrics=metrics, manager=manager,
                         include_path=paths)


def lm_eval_metrics(output: dict[str, Any], tasks: Sequence[str] | ResolvedTasks
                    ) -> dict[str, dict[str, float]]:
    """lm-eval's `simple_evaluate` output -> `{task: {metric: value}}` (module doc). Only
    the requested tasks (or groups) are kept when present, else every reported task."""
    table: dict[str, dict[str, Any]] = {}
    for part in ("results", "groups"):
        for task, values in (output.get(part) or {}).items():
            table.setdefault(gate_name(task), {}).update(values)
    counts = {gate_name(t): v.get("effective") for t, v in (output.get("n-samples") or {}).items()
              if isinstance(v, dict)}
    requested = (list(tasks.names.values()) if isinstance(tasks, ResolvedTasks)
                 else [gate_name(t) for t in tasks])
    wanted = [t for t in requested if t in table] or sorted(table)
    out: dict[str, dict[str, float]] = {}
    for task in wanted:
        values = table[task]
        n = values.get("sample_len", counts.get(task))
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            if not filt:  # sample_len and other bookkeeping
                continue
            stderr = metric.endswith("_stderr")
            name = metric_name(metric.removesuffix("_stderr"), filt)
            metrics[f"{name}_stderr" if stderr else name] = float(value)
            if not stderr and name.startswith(_PROPORTIONS) and isinstance(n, int) and n > 0:
                lower, upper = wilson_interval(round(float(value) * n), n)
                metrics[f"{name}_lower"], metrics[f"{name}_upper"] = lower, upper
        if isinstance(n, int):
            metrics["n"] = n
        out[task] = metrics
    return out


def run_tasks(model, tokenizer, tasks: Sequence[str] | ResolvedTasks, *,
              batch_size: int | None = None, limit: int | None = None, seed: int = 0,
              samples: dict[str, list] | None = None, quiet: bool = True
              ) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness tasks on a model in memory; `{task: {metric: value}}`.
    `samples`, if given, gets lm-eval's per-item records of each task (`--log-samples`).
    `UsageError` with installation instructions when `lm_eval` is not installed."""
    lm_eval, HFLM = _import_lm_eval()
    resolved = tasks if isinstance(tasks, ResolvedTasks) else None
    specs = resolved.specs if resolved is not None else list(tasks)
    extra = {"task_manager": resolved.manager} if resolved is not None else {}
    if samples is not None:
        extra["log_samples"] = True
    model = unwrap_model(model)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with quiet_lm_eval(quiet):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or 8)
            output = lm_eval.simple_evaluate(
                model=lm, tasks=list(specs), limit=limit, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                **extra)
    except (KeyError, ValueError, TypeError, AttributeError, OSError, ConnectionError) as e:
        raise _build_error(e, specs, getattr(resolved, "include_path", ())) from e
    finally:
        for module, training in modes.items():
            module.training = training
    if not output:
        raise UndoError("lm-eval returned no results")
    if samples is not None:
        for task, records in (output.get("samples") or {}).items():
            samples[gate_name(task)] = list(records)
    return lm_eval_metrics(output, resolved if resolved is not None else specs)


# The name the bridge had before it was a module of its own.
run_lm_eval = run_tasks
