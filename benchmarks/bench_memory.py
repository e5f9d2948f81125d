"""Peak memory of a training step with and without --gradient-checkpointing, and the memory
plan's estimate (`undo plan`) against the measured peak (issue 27).

A Llama of 8 layers, 256 wide (MLP 688), character vocabulary, trained with AdamW on rows of
1024 tokens, 2 per micro-batch: activations dominate (the weights, gradients and AdamW state
are ~100 MB, the activations ~350 MB without checkpointing). Each setting runs in a fresh
process (peak RSS is per process); after a warm-up run on a 1-layer model (libraries imported,
autograd and the allocator in use), RSS before the model is built is the baseline, and the
peak (VmHWM, reset there) after 3 optimizer steps minus it is the measured peak; the step
time is the mean of steps 2-3. Prints one table; the figures go into docs/benchmarks.md.

    python benchmarks/bench_memory.py          # ~1-2 minutes on one CPU thread
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

LAYERS, HIDDEN, HEADS, INNER, LENGTH, BATCH, STEPS = 8, 256, 4, 688, 1024, 2, 3


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def child(checkpointing: bool) -> dict:
    """One training run in this process: measured peak, step time and the plan."""
    import random
    import tempfile
    from pathlib import Path

    import torch

    from undo_cli.checkpoint.plan import plan_memory
    from undo_cli.data import build_stream
    from undo_cli.engine import TrainConfig, lm_loss, train
    from undo_cli.modelfactory import ModelShape, build_char_tokenizer, build_config, random_model

    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    rng = random.Random(0)
    data = Path(tempfile.mkdtemp()) / "text.jsonl"
    data.write_text("".join(json.dumps({"text": "".join(rng.choice("abcdefgh ") for _ in
                                                        range(3000))}) + "\n" for _ in range(8)))
    stream = build_stream(tok, [str(data)], LENGTH, BATCH, 0, name="train")
    config = build_config("llama", ModelShape(LAYERS, HIDDEN, HEADS, INNER, LENGTH), tok)
    # Warm up: the libraries train imports, autograd's and the allocator's first use, so that
    # the baseline holds everything but this run's model, state and activations.
    warm = random_model(build_config("llama", ModelShape(1, 16, 2, 32, 64), tok))
    train(warm, lm_loss(), {"train": build_stream(tok, [str(data)], 64, 2, 0, name="w")},
          TrainConfig(lr=1e-3, max_steps=1, device="cpu", gradient_checkpointing=checkpointing))
    del warm
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
    model = random_model(config)
    stamps: list[float] = []
    train(model, lm_loss(), {"train": stream},
          TrainConfig(lr=1e-3, max_steps=STEPS, device="cpu", log_every=STEPS,
                      gradient_checkpointing=checkpointing),
          on_step=lambda step, total, tokens: stamps.append(time.perf_counter()))
    peak = _status("VmHWM") - baseline
    plan = plan_memory(config.to_dict(), batch_size=BATCH, length=LENGTH,
                       gradient_checkpointing=checkpointing)
    return {"checkpointing": checkpointing, "measured": peak, "plan": plan.total,
            "activations": plan.activations, "static": plan.total - plan.activations,
            "step_s": (stamps[-1] - stamps[-3]) / 2,  # steps 2-3 (stamps[0]: the start)
            "parameters": plan.parameters}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2] == "1")))
        return
    # A fixed mmap threshold: every tensor over 128 kB gets its own mapping, returned when freed,
    # so RSS follows the live tensors. (glibc's default raises the threshold to 32 MB once a
    # mapping is freed, after which freed activations stay in the heap and RSS overstates the
    # peak by 100-200 MB here: fragmentation, not tensors.)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, __file__, "--child", flag], env=env, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)  # the raw figures, as each run ends
    mb = 1e6
    print(f"model: llama {LAYERS} layers x {HIDDEN} (MLP {INNER}), "
          f"{rows[0]['parameters']:,} parameters; {BATCH} x {LENGTH} tokens per micro-batch")
    print("| gradient checkpointing | measured peak | plan | plan / measured | "
          "plan: activations | step time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {'on' if r['checkpointing'] else 'off'} | {r['measured'] / mb:.0f} MB | "
              f"{r['plan'] / mb:.0f} MB | {r['plan'] / r['measured']:.2f} | "
              f"{r['activations'] / mb:.0f} MB | {r['step_s']:.2f} s |")
    off, on = rows
    print(f"peak ratio off/on: {off['measured'] / on['measured']:.2f}x; "
          f"step time on/off: {on['step_s'] / off['step_s']:.2f}x")


if __name__ == "__main__":
    main()
