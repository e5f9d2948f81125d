"""How much stronger is the widened adversary? The worst case of the default learning-rate
grid against the widened finetuning space and against an Optuna search, per model.

On the models of the arithmetic pipeline (`examples/arithmetic.sh`: unlearned, UNDO, oracle;
give its OUT directory), three `undo relearn-attack` runs per model, all with the demo's 100
steps per run and its eval sets (greedy exact match on 100 held-out equations):

- grid: the demo's attack (AdamW, constant schedule, batch 16, learning rates 1e-4,3e-4,1e-3);
- wide: every optimizer (adamw, adam, sgd, sgd-nesterov, adagrad) at its own default grid of
  ten learning rates, schedules constant and warmup-cosine, batch 16 (100 runs);
- search: `--search N` over optimizers x schedules (4) x batch sizes (4, 16, 64) x full or
  LoRA finetuning (N runs);
- utility: the wide space again under `--max-retain-drop 0.1` on retain accuracy (an attack
  that loses more than 10 points of retain accuracy does not count, TamperBench's rule).

It prints each model's worst case (final forget accuracy and AUC, the mean of the worst-case
curve), the configuration that gives it, and the relative robustness of UNDO (final and AUC)
under each adversary.

    python benchmarks/bench_adversary.py runs/arithmetic [--search 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def attack(root: Path, model: str, out: Path, *extra: str) -> dict:
    d = root / "data"
    cmd = [sys.executable, "-m", "undo_cli", "relearn-attack", str(root / model), "--data",
           str(d / "forget_train.jsonl"), "--eval", f"retain={d / 'retain_eval_equation.jsonl'}",
           "--eval", f"forget={d / 'forget_eval_equation.jsonl'}", "--forget-metric",
           "forget.accuracy", "--steps", "100", "--eval-every", "20", "--batch-size", "16",
           "--max-length", "64", "--out", str(out), "--overwrite", "--quiet", "--no-plot",
           *extra]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stderr}")
    results = json.loads((out / "results.json").read_text())
    results["_wall_s"] = time.time() - started
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="OUT of examples/arithmetic.sh")
    parser.add_argument("--search", type=int, default=30)
    parser.add_argument("--models", default="unlearned,undo,oracle")
    parser.add_argument("--adversaries", default="grid,wide,search,utility")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    adversaries = {
        "grid": ["--lrs", "1e-4,3e-4,1e-3"],
        "wide": ["--optimizers", "adamw,adam,sgd,sgd-nesterov,adagrad",
                 "--schedules", "constant,warmup-cosine"],
        "search": ["--optimizers", "adamw,adam,sgd,sgd-nesterov,adagrad",
                   "--schedules", "constant,warmup-cosine,cosine,linear",
                   "--batch-sizes", "4,16,64", "--search", str(args.search)],
        "utility": ["--optimizers", "adamw,adam,sgd,sgd-nesterov,adagrad",
                    "--schedules", "constant,warmup-cosine", "--max-retain-drop", "0.1",
                    "--retain-metric", "retain.accuracy"],
    }
    chosen = [a for a in args.adversaries.split(",") if a]
    models = [m for m in args.models.split(",") if m]
    table: dict[str, dict[str, dict]] = {}
    for name in chosen:
        for model in models:
            res = attack(args.root, model, args.root / "adversary" / name / model,
                         *adversaries[name])
            s = res["summary"]
            table.setdefault(name, {})[model] = {
                "final": s["final"], "auc": s["auc"], "best": s.get("best_config"),
                "runs": len(res["runs"]), "excluded": s.get("excluded_evaluations"),
                "wall_s": round(res["_wall_s"], 1)}
            print(f"{name:8} {model:10} final {s['final']:.3f}  AUC {s['auc']:.3f}  "
                  f"runs {len(res['runs']):3}  by {s.get('best_config')}  "
                  f"({res['_wall_s']:.0f} s)", flush=True)

    def robustness(row: dict, key: str) -> float | None:
        u, o, x = row.get("unlearned"), row.get("oracle"), row.get("undo")
        if not (u and o and x) or o[key] == u[key]:
            return None
        return (x[key] - u[key]) / (o[key] - u[key])

    print()
    print("adversary  unlearned final/AUC   UNDO final/AUC   oracle final/AUC   "
          "UNDO robustness final/AUC")
    for name, row in table.items():
        cells = [f"{row[m]['final']:.2f} / {row[m]['auc']:.2f}" if m in row else "-"
                 for m in ("unlearned", "undo", "oracle")]
        r_final, r_auc = robustness(row, "final"), robustness(row, "auc")
        shown = [f"{v:.0%}" if v is not None else "-" for v in (r_final, r_auc)]
        print(f"{name:9}  {cells[0]:>20}   {cells[1]:>14}   {cells[2]:>16}   "
              f"{shown[0]:>8} / {shown[1]}")
    if args.json:
        print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
