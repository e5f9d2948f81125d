"""Is `undo relearn-attack` at least as strong as a plain PyTorch loop on short records?

The worst case `undo` reports is only as good as its attack. This benchmark checks the attack
against the simplest one a user would write, on the data where packing matters most: short
records (a memorised lookup table, `kv cb > dg`), each evaluated alone.

Set-up, all local, all through the `undo` command line except the reference loop:

1. a 64-entry lookup table of random two-letter keys and values, as `{"text"}` records
   ("kv cb > dg") and as prompt/answer evaluation items ("kv cb > " -> "dg");
2. `undo train` a tiny Llama (preset `tiny`, character tokenizer) until it knows the table;
3. `undo unlearn --method maxent` on the table until its accuracy is gone;
4. the attacks, at the same learning rates and steps with the same records per step:
   - `undo relearn-attack` with `--packing documents` (the default),
   - the same with `--packing concat` (undo before document-aware packing),
   - a plain loop: AdamW, one record per row, right-padded, loss on every token (a causal
     LM loss with padding ignored), the records reshuffled each epoch.
   All are scored by the same metric: `undo eval`'s greedy exact match on the 64 prompts.

It prints the worst case over learning rates of each attack at every evaluated step, side by
side, and the ratio undo / plain at the end. `--json` prints everything.

    python benchmarks/bench_attack_parity.py [--lrs 1e-4,3e-4,1e-3] [--steps 100]
        [--records-per-step 16] [--eval-every 10] [--seeds 2] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from undo_cli.evaluate import evaluate_model, flatten_metrics, load_eval_set  # noqa: E402
from undo_cli.runtime import quiet_libraries  # noqa: E402


def make_table(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct keys "ab cd" mapped to random two-letter values."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    keys: set[str] = set()
    while len(keys) < n:
        keys.add(f"{rng.choice(letters)}{rng.choice(letters)} "
                 f"{rng.choice(letters)}{rng.choice(letters)}")
    return [(k, rng.choice(letters) + rng.choice(letters)) for k in sorted(keys)]


def undo(*args: object) -> None:
    cmd = [sys.executable, "-m", "undo_cli", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def plain_attack(model_dir: Path, records: list[str], eval_path: Path, lr: float, steps: int,
                 per_step: int, eval_every: int, seed: int) -> dict[int, float]:
    """The reference: the loop a user writes in 30 lines (one record per row, padded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    sets = [load_eval_set("table", eval_path, tok)]
    encoded = [tok(r)["input_ids"] + [tok.eos_token_id] for r in records]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    curve = {0: flatten_metrics(evaluate_model(model, tok, sets))["table.accuracy"]}
    model.train()
    for step in range(1, steps + 1):
        if len(order) < per_step:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        rows = [encoded[i] for i in order[:per_step]]
        del order[:per_step]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            curve[step] = flatten_metrics(evaluate_model(model, tok, sets))["table.accuracy"]
            model.train()
    return curve


def undo_curve(results_dir: Path) -> dict[int, float]:
    results = json.loads((results_dir / "results.json").read_text())
    return {int(e["step"]): float(e["value"]) for e in results["worst_case"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--records-per-step", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--entries", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--unlearn-steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    lrs = [float(x) for x in args.lrs.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="undo-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    table = make_table(args.entries, seed=0)
    records = [f"{k} > {v}" for k, v in table]
    (work / "table.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    (work / "table_eval.jsonl").write_text("".join(
        json.dumps({"prompt": f"{k} > ", "answer": v}) + "\n" for k, v in table))
    # Other text the base model also knows (kept by unlearning as the retain set).
    rng = random.Random(1)
    other = [f"{a} + {b} = {a + b}" for a, b in
             ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(400))]
    (work / "other.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in other))
    evals = ["--eval", f"table={work / 'table_eval.jsonl'}"]

    # Record length: BOS + 10 characters + EOS = 12 tokens; rows of 16 hold one record, so
    # --batch-size N trains on N records a step (as the plain loop does).
    length = 16
    undo("train", work / "base", "--init", "tiny", "--data", work / "table.jsonl",
         "--data", work / "other.jsonl", "--max-steps", args.train_steps, "--lr", "3e-3",
         "--warmup-steps", 50, "--batch-size", 32, "--max-length", length, "--overwrite",
         "--quiet")
    undo("unlearn", work / "base", work / "unlearned", "--method", "maxent",
         "--forget", work / "table.jsonl", "--retain", work / "other.jsonl",
         "--max-steps", args.unlearn_steps, "--lr", "1e-3", "--batch-size", 16,
         "--max-length", length, "--overwrite", "--quiet")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "unlearned")
    sets = [load_eval_set("table", work / "table_eval.jsonl", tok)]
    accuracy = {name: flatten_metrics(evaluate_model(
        AutoModelForCausalLM.from_pretrained(work / name), tok, sets))["table.accuracy"]
        for name in ("base", "unlearned")}

    curves: dict[str, dict[int, float]] = {}
    for packing in ("documents", "concat"):
        out = work / f"attack-{packing}"
        undo("relearn-attack", work / "unlearned", "--data", work / "table.jsonl", *evals,
             "--lrs", args.lrs, "--steps", args.steps, "--eval-every", args.eval_every,
             "--batch-size", args.records_per_step, "--max-length", length,
             "--packing", packing, "--seeds", args.seeds, "--forget-metric", "table.accuracy",
             "--out", out, "--overwrite",
             "--quiet", "--no-plot")
        curves[f"undo --packing {packing}"] = undo_curve(out)
    plain_runs = {}
    for lr in lrs:
        per_seed = [plain_attack(work / "unlearned", records, work / "table_eval.jsonl", lr,
                                 args.steps, args.records_per_step, args.eval_every, seed)
                    for seed in range(args.seeds)]
        plain_runs[lr] = {s: sum(c[s] for c in per_seed) / len(per_seed) for s in per_seed[0]}
    steps = sorted(next(iter(plain_runs.values())))
    curves["plain loop"] = {s: max(run[s] for run in plain_runs.values()) for s in steps}

    names = list(curves)
    print(f"table accuracy: base {accuracy['base']:.2f}, unlearned {accuracy['unlearned']:.2f}; "
          f"attack: lrs {args.lrs}, {args.steps} steps, {args.records_per_step} records a step, "
          f"{args.seeds} seed(s); worst case over learning rates")
    print("step  " + "  ".join(f"{n:>22}" for n in names))
    for s in steps:
        print(f"{s:>4}  " + "  ".join(f"{curves[n].get(s, float('nan')):>22.3f}" for n in names))
    final = {n: curves[n][steps[-1]] for n in names}
    ratio = final["undo --packing documents"] / max(final["plain loop"], 1e-9)
    # Mean of each worst-case curve over the attack (trapezoids): how fast it comes back.
    auc = {n: sum((b - a) * (curves[n][a] + curves[n][b]) / 2 for a, b in zip(steps, steps[1:]))
           / (steps[-1] - steps[0]) for n in names}
    print("final: " + ", ".join(f"{n} {v:.3f}" for n, v in final.items())
          + f"; undo (documents) / plain = {ratio:.2f}")
    print("AUC:   " + ", ".join(f"{n} {v:.3f}" for n, v in auc.items())
          + "; undo (documents) / plain = "
          f"{auc['undo --packing documents'] / max(auc['plain loop'], 1e-9):.2f}")
    print(f"wall time {time.time() - started:.0f} s; work dir {work}")
    if args.json:
        print(json.dumps({"accuracy": accuracy, "curves": curves, "final": final,
                          "auc": auc, "ratio": ratio, "plain_per_lr": plain_runs}, indent=2))


if __name__ == "__main__":
    main()
