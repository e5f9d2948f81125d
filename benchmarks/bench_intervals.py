"""Which attack setting makes the demo's verdict steadiest for its time? Interval widths of
UNDO's relative robustness under the demo's attack and three alternatives of about the same
cost, all pooled over seeds by `undo report`'s bootstrap (seeds, and items within seeds).

Give the OUT directories of `examples/arithmetic.sh` runs with different SEEDs that share base,
unlearned and oracle models (`SEEDS=3` writes them as `undo`, `undo-s1`, `undo-s2` in one OUT;
runs made with `STAGES=undo` in separate OUTs work too). For every variant and every seed s, the
unlearned model, the oracle and UNDO seed s are attacked with attack seed s:

- grid (the demo's default): learning rates 1e-4,3e-4,1e-3, 100 steps, eval every 20,
  the 100 held-out equations (300 training steps per model and seed);
- auc: the same runs, robustness from the AUC instead of the final point (no extra cost);
- long: one learning rate (1e-3, the grid's most frequent winner) for 300 steps, eval every 60;
- seeds: one learning rate (1e-3) for 100 steps under three attack seeds (300 steps);
- items: the grid on 200 held-out items (100 equations + 100 word problems; twice the
  evaluation cost).

    python benchmarks/bench_intervals.py runs/arithmetic [--variants grid,long,seeds,items]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from undo_cli.report import build_report

VARIANTS = {
    "grid": (["--lrs", "1e-4,3e-4,1e-3", "--steps", "100", "--eval-every", "20"], "equation"),
    "long": (["--lrs", "1e-3", "--steps", "300", "--eval-every", "60"], "equation"),
    "seeds": (["--lrs", "1e-3", "--steps", "100", "--eval-every", "20", "--seeds", "3"],
              "equation"),
    "items": (["--lrs", "1e-4,3e-4,1e-3", "--steps", "100", "--eval-every", "20"], "all"),
}


def attack(model: Path, data: Path, out: Path, seed: int, variant: str) -> float:
    extra, evals = VARIANTS[variant]
    suffix = "_equation" if evals == "equation" else ""
    cmd = [sys.executable, "-m", "undo_cli", "relearn-attack", str(model), "--data",
           str(data / "forget_train.jsonl"),
           "--eval", f"retain={data / f'retain_eval{suffix}.jsonl'}",
           "--eval", f"forget={data / f'forget_eval{suffix}.jsonl'}",
           "--forget-metric", "forget.accuracy", "--batch-size", "16", "--max-length", "64",
           "--seed", str(seed), "--out", str(out), "--overwrite", "--quiet", "--no-plot", *extra]
    started = time.time()
    if not (out / "results.json").is_file():
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}\n{proc.stderr}")
    return time.time() - started


def _pct(value: float) -> str:
    return f"{round(100 * value):d}%"  # never `-0%`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="OUT of examples/arithmetic.sh (seed 0)")
    parser.add_argument("--undo", type=Path, nargs="+",
                        help="UNDO models, one per seed (default: ROOT/undo, ROOT/undo-s1, ...)")
    parser.add_argument("--variants", default="grid,long,seeds,items")
    parser.add_argument("--out", type=Path, help="where the attacks go (default ROOT/intervals)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    undo = args.undo or sorted([args.root / "undo", *args.root.glob("undo-s*")])
    out = args.out or args.root / "intervals"
    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        wall = 0.0
        specs = []
        for seed, model in enumerate(undo):
            for label, path in (("unlearned", args.root / "unlearned"),
                                ("oracle", args.root / "oracle"), ("undo", model)):
                target = out / variant / f"{label}-s{seed}"
                wall += attack(path, args.root / "data", target, seed, variant)
                specs.append(f"{label}={target}")
        for kind, key in (("final", "relative_robustness"), ("auc", "relative_robustness_auc")):
            for pooled in (1, len(undo)):
                chosen = [s for s in specs if int(s.rsplit("-s", 1)[1]) < pooled]
                row = next(r for r in build_report(chosen)["rows"] if r["model"] == "undo")
                low, high = row[f"{key}_lower"], row[f"{key}_upper"]
                rows.append({"variant": variant if kind == "final" else f"{variant} (AUC)",
                             "seeds": pooled, "point": row[key], "lower": low, "upper": high,
                             "width": None if low is None else high - low,
                             "wall_s": wall / len(undo) * pooled})
                print(f"{rows[-1]['variant']:14s} seeds {pooled}  robustness "
                      f"{_pct(row[key])} [{_pct(low)}, {_pct(high)}]  width "
                      f"{_pct(high - low)}  attack wall {rows[-1]['wall_s']:.0f} s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
