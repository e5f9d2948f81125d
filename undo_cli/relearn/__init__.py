"""The relearning attack (`undo relearn-attack`): how fast does finetuning bring a capability
back?

An unlearned model that only *suppresses* a capability relearns it in a few hundred steps of
finetuning on the forget domain; a model that never had it (or an UNDO student) relearns it
about as slowly as learning from scratch. The attack measures this as the paper does: for each
learning rate of a grid (default: ten log-spaced values from 1e-6 to 1e-3) and each seed, a
copy of the original weights is finetuned on the attack data and every eval set is evaluated
on a schedule; the worst case for the defender at each step is the best forget metric over the
grid (seeds averaged first).

- `worst_case.py`: the statistics of the worst case (pure functions, no torch);
- `runner.py`: `run_attack`, the grid on a model in memory (full, LoRA, quantisation);
- `plan.py`: `plan_attack`, every decision of an attack before any weight loads (a frozen
  `AttackPlan`), and the records results.json and undo.json keep of it;
- `results.py`: `relearn_checkpoint` (a checkpoint in, a results directory out; results.json's
  schema is docs/relearn-results.md) and `compare_results` (`--compare`).
"""

from undo_cli.relearn.plan import AttackPlan, describe_attack, plan_attack
from undo_cli.relearn.results import (
    RESULTS_NAME,
    compare_results,
    default_label,
    gate_values,
    load_results,
    parse_compare_spec,
    relearn_checkpoint,
    run_attack_plan,
)
from undo_cli.relearn.runner import SCHEMA_VERSION, AttackProgress, run_attack
from undo_cli.relearn.worst_case import (
    area_under_curve,
    final_metrics,
    group_means,
    metric_direction,
    per_config_table,
    resolve_forget_metric,
    summarize,
    worst_case_curve,
)

__all__ = [
    "AttackPlan", "AttackProgress", "RESULTS_NAME", "SCHEMA_VERSION", "area_under_curve",
    "compare_results", "default_label", "describe_attack", "final_metrics", "gate_values",
    "group_means", "load_results", "metric_direction", "parse_compare_spec", "per_config_table",
    "plan_attack", "relearn_checkpoint", "resolve_forget_metric", "run_attack",
    "run_attack_plan", "summarize", "worst_case_curve",
]
