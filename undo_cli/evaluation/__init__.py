"""`undo eval`'s library: checkpoints evaluated one at a time on data sets and
lm-evaluation-harness tasks, a reference model, `--fail-if` gates (`checkpoints.py`), and the
bridge to lm-eval (`harness.py`)."""

from undo_cli.evaluation.checkpoints import (
    OnSamples,
    evaluate_and_gate,
    evaluate_checkpoints,
    write_samples,
)
from undo_cli.evaluation.harness import (
    ResolvedTasks,
    gate_name,
    lm_eval_available,
    lm_eval_metrics,
    metric_name,
    quiet_lm_eval,
    resolve_tasks,
    run_lm_eval,
    run_tasks,
)

__all__ = ["OnSamples", "ResolvedTasks", "evaluate_and_gate", "evaluate_checkpoints",
           "gate_name", "lm_eval_available", "lm_eval_metrics", "metric_name",
           "quiet_lm_eval", "resolve_tasks", "run_lm_eval", "run_tasks", "write_samples"]
