"""Distillation benchmarks (issue: `undo distill`), printed side by side in one run.

1. Throughput: `undo distill`'s engine path (packed blocks, chunked KL from hidden states)
   against a reference loop written as the paper's code does it (each document padded to
   max-length, no packing, full-vocabulary softmax of both models in fp32), on mixed-length
   text with a ~10M-parameter student and teacher. Tokens/s counts real (non-padding) tokens.
2. Model FLOP utilisation: (6 * P_student + 2 * P_teacher) * tokens/s against the machine's
   fp32 matmul rate, measured here.
3. Peak memory of one loss + backward on a model with a 128k-token vocabulary at sequence
   length 1024, chunked against plain (each in its own process; peak RSS).
4. An alpha sweep of 4 students with the teacher cache against 4 separate runs.

Run: `python benchmarks/bench_distill.py [--steps 20]` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_rate(n: int = 1024, reps: int = 20) -> float:
    """Measured fp32 matmul FLOP/s on this machine (all of torch's threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def mixed_documents(path: Path, n: int = 600, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "robust", "unlearn", "noise", "distill",
             "teacher", "student", "model", "weights", "12", "7", "+", "="]
    with open(path, "w") as f:
        for _ in range(n):
            # Mostly short documents with a long tail (as web text is): 2 to 60 words.
            length = min(60, max(2, int(rng.lognormvariate(2.3, 0.8))))
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(length))}) + "\n")
    return path


def build_pair(preset: str = "small"):
    from undo_cli.modelfactory import (
        build_char_tokenizer,
        build_config,
        random_model,
        resolve_shape,
    )

    tok = build_char_tokenizer()
    config = build_config("llama", resolve_shape(preset), tok)
    return tok, random_model(config, seed=1).eval(), random_model(config, seed=2)


def engine_throughput(tok, teacher, student, data: Path, steps: int, max_length: int,
                      batch: int) -> dict:
    from undo_cli.data import build_stream
    from undo_cli.distill import kd_loss_fn
    from undo_cli.engine import TrainConfig, train

    teacher.requires_grad_(False)
    stream = build_stream(tok, [str(data)], max_length, batch, 0, name="train")
    config = TrainConfig(lr=1e-4, max_steps=steps + 2, batch_size=batch,
                         log_every=1000)
    # Two warm-up steps are included in the budget; time the rest from the log.
    start = time.perf_counter()
    result = train(student, kd_loss_fn(teacher, chunk_size=1024), {"train": stream}, config,
                   frozen_forward_params=sum(p.numel() for p in teacher.parameters()))
    wall = time.perf_counter() - start
    return {"tokens": result.tokens, "wall_s": wall, "tokens_per_s": result.tokens / wall}


def reference_throughput(tok, teacher, student, data: Path, steps: int, max_length: int,
                         batch: int) -> dict:
    """The paper-style loop: pad every document to max_length, full softmax in fp32."""
    import torch.nn.functional as F

    docs = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    encoded = [tok(d)["input_ids"][:max_length] for d in docs]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    student.train()
    tokens, start = 0, None
    for step in range(steps + 2):
        if step == 2:
            start, tokens = time.perf_counter(), 0
        chunk = [encoded[(step * batch + i) % len(encoded)] for i in range(batch)]
        ids = torch.full((batch, max_length), tok.pad_token_id)
        mask = torch.zeros((batch, max_length), dtype=torch.long)
        for i, seq in enumerate(chunk):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits.float()
        s_logits = student(input_ids=ids, attention_mask=mask).logits.float()
        t_prob = F.softmax(t_logits, dim=-1)
        s_logp = F.log_softmax(s_logits, dim=-1)
        kl = (t_prob * (torch.log(t_prob + 1e-10) - s_logp)).sum(-1)
        loss = (kl * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens += int(mask.sum())
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


MEMORY_CHILD = r"""
import sys, torch
def hwm():  # peak resident memory (MB) since the last reset of /proc/self/clear_refs
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
# A forked child inherits its parent's ru_maxrss: reset the high-water mark first.
open("/proc/self/clear_refs", "w").write("5")
from transformers import LlamaConfig, AutoModelForCausalLM
sys.path.insert(0, sys.argv[2])
from undo_cli.distill import chunked_distill_loss, distill_loss
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128_000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                  tie_word_embeddings=True)
teacher = AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
student = AutoModelForCausalLM.from_config(cfg)
ids = torch.randint(0, 128_000, (1, 1024))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
if sys.argv[1] == "chunked":
    loss, _ = chunked_distill_loss(student, teacher, batch, chunk_size=128)
else:
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    loss, _ = distill_loss(student(input_ids=ids).logits, t, ids)
loss.backward()
peak = hwm()
print(base, peak, float(loss))
"""


def memory(kind: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind, str(ROOT)],
                         capture_output=True, text=True, check=True)
    base, peak, loss = map(float, out.stdout.split())
    return {"models_mb": base, "peak_mb": peak, "extra_mb": peak - base, "loss": loss}


def sweep(tmp: Path, data: Path, steps: int) -> dict:
    """4 students (alpha 0.2..0.8) distilled from one tiny teacher, with and without cache."""
    undo = [sys.executable, "-m", "undo_cli"]
    subprocess.run(undo + ["init", str(tmp / "teacher"), "--preset", "small"], check=True,
                   capture_output=True)
    common = ["--teacher", str(tmp / "teacher"), "--data", str(data), "--max-steps", str(steps),
              "--max-length", "256", "--batch-size", "16", "--quiet"]
    timings = {}
    for mode in ("separate", "cached"):
        start = time.perf_counter()
        for alpha in (0.2, 0.4, 0.6, 0.8):
            extra = ["--cache-teacher", str(tmp / "cache"), "--cache-topk", "128"] \
                if mode == "cached" else []
            subprocess.run(undo + ["distill", str(tmp / f"{mode}-{alpha}"), "--alpha",
                                   str(alpha), "--beta", "0.1", *common, *extra], check=True)
        timings[mode] = time.perf_counter() - start
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    from undo_cli.runtime import quiet_libraries

    quiet_libraries()
    print(f"load average: {os.getloadavg()}  threads: {torch.get_num_threads()}")
    rate = matmul_rate()
    print(f"fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = mixed_documents(tmp / "docs.jsonl")
        tok, teacher, student = build_pair()
        params = sum(p.numel() for p in student.parameters())
        ref_student = build_pair()[2]
        ref = reference_throughput(tok, teacher, ref_student, data, args.steps, args.max_length,
                                   args.batch_size)
        eng = engine_throughput(tok, teacher, student, data, args.steps, args.max_length,
                                args.batch_size)
        for name, r in (("reference (padded)", ref), ("undo distill", eng)):
            mfu = 8 * params * r["tokens_per_s"] / rate
            print(f"{name:20s} {r['tokens_per_s']:9.0f} tok/s   MFU {mfu:5.1%}")
        print(f"speed-up: {eng['tokens_per_s'] / ref['tokens_per_s']:.2f}x  "
              f"(student = teacher = {params / 1e6:.1f}M parameters)")
        plain, chunked = memory("plain"), memory("chunked")
        print(f"128k vocab, seq 1024, peak RSS of loss+backward: plain {plain['peak_mb']:.0f} MB, "
              f"chunked {chunked['peak_mb']:.0f} MB (models alone {plain['models_mb']:.0f} MB; "
              f"same loss: {plain['loss']:.5f} vs {chunked['loss']:.5f})")
        if not args.skip_sweep:
            t = sweep(tmp, data, args.steps)
            print(f"alpha sweep of 4: separate {t['separate']:.1f} s, with teacher cache "
                  f"{t['cached']:.1f} s (saving {1 - t['cached'] / t['separate']:.0%})")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"max RSS of this process: {rss:.0f} MB")


if __name__ == "__main__":
    main()
