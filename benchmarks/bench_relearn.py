"""Evaluation overhead of `undo relearn-attack`: the share of an attack's wall time spent
evaluating, on the default schedule (500 steps per run, evaluation at step 0, every 25 steps
and at the last step; `--eval-schedule log`, the default, widens the gaps beyond 20
evaluations, so `--steps 2000` measures it on a long run). Target: at most 15%.

Set-up, all local: the synthetic arithmetic task (`undo data arithmetic`, default sizes), a
model of preset `tiny` (2-layer, 128-wide Llama, character tokenizer) pretrained briefly on
retain + forget text so that it answers in short lines, then `relearn.run_attack` on the
forget training text at `--lrs` with the exact-match accuracy of the forget and retain
equation sets (100 prompts each) as metrics, evaluated by `undo eval`'s batched greedy
generation.

Side by side in the same run, on the attacked model: one evaluation with batched generation
(as the attack does) against one with one prompt at a time (`eval_batch_size=1`); the share
the attack would have spent evaluating one prompt at a time is derived from that ratio:
E * t_single / (train time + E * t_single), E evaluations.

    python benchmarks/bench_relearn.py [--lrs 1e-4,1e-3] [--steps 500] [--eval-every 25]
        [--eval-schedule log|linear] [--train-steps 300] [--batch-size 8] [--max-length 64]
        [--threads 1] [--json]

Run it with OMP_WAIT_POLICY=PASSIVE on a shared machine, and compare figures only from runs
under the same load (the output ends with the load average). With `--eval-schedule linear`,
`worst_case_auc_on_log_steps` is the AUC the default schedule would report on the same runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from undo_cli.data import build_stream  # noqa: E402
from undo_cli.engine import TrainConfig, lm_loss, train  # noqa: E402
from undo_cli.evaluate import evaluate_model, load_eval_set  # noqa: E402
from undo_cli.modelfactory import (  # noqa: E402
    build_char_tokenizer,
    build_config,
    count_parameters,
    random_model,
    resolve_shape,
)
from undo_cli.options import AttackConfig, evaluation_steps, parse_lrs  # noqa: E402
from undo_cli.relearn import area_under_curve, run_attack  # noqa: E402
from undo_cli.runtime import pick_device, quiet_libraries  # noqa: E402
from undo_cli.synthetic import ALPHABET, arithmetic_records, write_arithmetic  # noqa: E402


def timed_eval(model, tok, sets, batch_size, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluate_model(model, tok, sets, batch_size=batch_size)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", default="1e-4,1e-3")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-schedule", default=None, choices=("log", "linear"),
                        help="default: the library's")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    quiet_libraries()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-relearn-"))
    paths = write_arithmetic(arithmetic_records(), tmp)
    tok = build_char_tokenizer(ALPHABET)
    model = random_model(build_config("llama", resolve_shape("tiny"), tok), seed=0).to(device)

    t0 = time.perf_counter()
    pretrain = build_stream(tok, [f"{paths['retain_train']}:1", f"{paths['forget_train']}:1"],
                            args.max_length, 16, 0, name="pretrain")
    train(model, lm_loss("pretrain"), {"pretrain": pretrain},
          TrainConfig(lr=1e-3, max_steps=args.train_steps, warmup_steps=20, batch_size=16,
                      device=str(device)))
    pretrain_s = time.perf_counter() - t0

    sets = [load_eval_set("forget", paths["forget_eval_equation"], tok),
            load_eval_set("retain", paths["retain_eval_equation"], tok)]
    schedule = {"eval_schedule": args.eval_schedule} if args.eval_schedule else {}
    config = AttackConfig(lrs=parse_lrs(args.lrs), steps=args.steps, **schedule,
                          train=TrainConfig(schedule="constant", max_steps=1,
                                            eval_every=args.eval_every,
                                            batch_size=args.batch_size, device=str(device)))

    def make_stream(seed: int, batch_size: int):
        return build_stream(tok, [str(paths["forget_train"])], args.max_length, batch_size,
                            seed, name="attack")

    attacked = []
    results = run_attack(model, tok, sets, config, forget_metric="forget.accuracy",
                         make_stream=make_stream, on_model=lambda run, m: attacked.append(m))
    timing = results["timing"]
    last = attacked[-1]
    batched_s = timed_eval(last, tok, sets, None)
    single_s = timed_eval(last, tok, sets, 1)
    n = timing["evaluations"]
    train_s = timing["wall_s"] - timing["eval_s"]
    single_share = n * single_s / (train_s + n * single_s)
    out = {
        "device": str(device), "threads": args.threads, "parameters": count_parameters(model),
        "pretrain_steps": args.train_steps, "pretrain_s": round(pretrain_s, 1),
        "lrs": config.lrs, "steps": args.steps, "eval_every": args.eval_every,
        "eval_schedule": getattr(config, "eval_schedule", "linear"),
        "batch_size": args.batch_size, "max_length": args.max_length,
        "eval_prompts": sum(s.n for s in sets), "evaluations": n,
        "initial_forget_accuracy": results["initial"]["forget.accuracy"],
        "worst_case_final": results["summary"]["final"],
        "worst_case_auc": round(results["summary"]["auc"], 4),
        # The AUC the log schedule would report on the same runs: its steps are a subset of
        # the linear schedule's and evaluating does not change training.
        "worst_case_auc_on_log_steps": round(area_under_curve(
            [(p["step"], p["value"]) for p in results["worst_case"]
             if p["step"] in {0, *evaluation_steps(args.steps, args.eval_every)}]), 4),
        "train_step_s": round(train_s / (len(config.lrs) * args.steps), 4),
        "attack_wall_s": round(timing["wall_s"], 1), "attack_eval_s": round(timing["eval_s"], 1),
        "eval_share": round(timing["eval_share"], 4),
        "one_eval_batched_s": round(batched_s, 3), "one_eval_one_prompt_at_a_time_s":
            round(single_s, 3), "eval_speedup": round(single_s / batched_s, 1),
        "eval_share_if_one_at_a_time": round(single_share, 4),
        "target_met": timing["eval_share"] <= 0.15,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>32}: {value}")


if __name__ == "__main__":
    main()
