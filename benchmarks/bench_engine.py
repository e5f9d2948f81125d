"""Training throughput of the engine against a plain padded loop, and model FLOP utilisation.

    python benchmarks/bench_engine.py                 # CPU, the ~10M-parameter `small` preset
    python benchmarks/bench_engine.py --device cuda --bf16

Both loops train the same model (preset `small`: Llama, 6 layers, 384 wide, character
tokenizer) from the same initial weights, on the same data set of mixed-length documents,
with the same batch of `--batch-size` sequences of `--max-length` tokens and the same AdamW
settings. They differ in what the engine exists for:

- reference: the loop the paper's research code uses (Hugging Face style): each document is
  tokenised and padded to `--max-length`, batches come from a shuffling DataLoader, the loss
  is `model(**batch).loss`, and `loss.item()` is read every step for logging.
- engine: `undo_cli.engine.train` on `undo_cli.data.build_stream`, which packs documents
  into rows, so (almost) no compute is spent on padding; once per packing mode, side by
  side (`--packing documents,concat`): `documents` (the default: whole documents share a
  row, best fit, each attending only to itself through the block-diagonal mask transformers
  builds from restarting position ids) and `concat` (a continuous stream cut into full
  blocks, documents attending across their boundaries).

Throughput counts *real* (non-padding) tokens per second, in steady state (warmup steps are
excluded). MFU = 6 * parameters * tokens/s / peak, where the peak is the fp32 (or, with --bf16,
bf16) matmul rate measured in this same run on square matrices; an "incl. attention" MFU adds
the attention score FLOPs (12 * layers * length * width per token). Everything is printed;
the figures recorded in docs/benchmarks.md come from this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from undo_cli.runtime import quiet_libraries  # noqa: E402

WORDS = ("the", "farmer", "has", "apples", "and", "gives", "away", "some", "of", "them",
         "to", "her", "friend", "how", "many", "are", "left", "each", "box", "holds", "in",
         "total", "after", "buying", "more", "at", "market", "price", "was", "dollars")


def make_documents(n: int, seed: int, max_length: int) -> list[str]:
    """Mixed lengths like the project's arithmetic data: half bare equations (short), half
    word problems and prose (longer, up to `max_length` characters)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice("+-*")
            value = a + b if op == "+" else a - b if op == "-" else a * b
            docs.append(f"{a} {op} {b} = {value}")
        else:
            target = rng.randint(40, max_length - 1)
            words = []
            while len(" ".join(words)) < target:
                words.append(rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(1, 99)))
            docs.append(" ".join(words)[:target].strip() + ".")
    return docs


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048,
                seconds: float = 2.0) -> float:
    """Best measured FLOP/s of a square `size` matmul (the machine's attainable rate)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    reps = 1
    while time.perf_counter() < deadline:
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        dt = time.perf_counter() - t
        best = max(best, 2 * size**3 * reps / dt)
        if dt < 0.05:
            reps *= 2
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(tokenizer, max_length: int, seed: int, preset: str):
    from undo_cli.modelfactory import build_config, random_model, resolve_shape

    shape = resolve_shape(preset, max_position=max(max_length, 512))
    return random_model(build_config("llama", shape, tokenizer), seed=seed)


def reference_loop(model, tokenizer, docs, args, device) -> dict:
    """The padded, unpacked loop (as in the paper's research code)."""
    from torch.utils.data import DataLoader

    enc = tokenizer(docs, padding="max_length", truncation=True, max_length=args.max_length,
                    return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    rows = [{"input_ids": i, "attention_mask": m, "labels": lab}
            for i, m, lab in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)]
    loader = DataLoader(rows, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    model.to(device).train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0,
                                  **({"fused": True} if device.type == "cuda" else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16
                else torch.autocast(device.type, enabled=False))
    steps, tokens, padded, losses = 0, 0, 0, []
    start = None
    while steps < args.warmup + args.steps:
        for batch in loader:
            if steps == args.warmup:
                sync(device)
                start = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())  # logged every step, as research loops do
            if steps >= args.warmup:
                tokens += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
            steps += 1
            if steps >= args.warmup + args.steps:
                break
    sync(device)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "padding_fraction": 1 - tokens / padded, "final_loss": losses[-1]}


def engine_loop(model, tokenizer, data_file, args, device, packing: str) -> dict:
    from undo_cli.data import build_stream
    from undo_cli.engine import TrainConfig, lm_loss, train

    def stream():
        return build_stream(tokenizer, [str(data_file)], args.max_length, args.batch_size,
                            args.seed, name="train", packing=packing)

    # The same batches again, to count the padding slots of the timed steps.
    replay = stream()
    batches = [next(replay) for _ in range(args.warmup + args.steps)][args.warmup:]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["attention_mask"].numel() for b in batches)
    stream = stream()
    config = TrainConfig(lr=args.lr, max_steps=args.warmup + args.steps, batch_size=args.batch_size,
                         log_every=1, seed=args.seed, device=str(device),
                         bf16=args.bf16)
    result = train(model, lm_loss("train"), {"train": stream}, config)
    # log_every=1: one line per step, each with that step's tokens/s; steps after warmup only
    lines = [e for e in result.log if e["type"] == "train"]
    steady = list(zip(lines, lines[1:], strict=False))[args.warmup - 1:]
    tokens = sum(cur["tokens"] - prev["tokens"] for prev, cur in steady)
    seconds = sum((cur["tokens"] - prev["tokens"]) / cur["tokens_per_s"] for prev, cur in steady)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "padding_fraction": 1 - real / slots, "final_loss": result.loss["loss"],
            "wall_time_s": result.wall_time_s, "packing": packing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--packing", default="documents,concat",
                        help="engine packing modes to time, side by side")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary")
    args = parser.parse_args()
    modes = [m.strip() for m in args.packing.split(",") if m.strip()]
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    if args.bf16 and device.type != "cuda":
        parser.error("--bf16 needs --device cuda")

    from undo_cli.modelfactory import build_char_tokenizer, count_parameters

    tokenizer = build_char_tokenizer()
    docs = make_documents(args.docs, args.seed, args.max_length)
    lengths = [len(tokenizer(d)["input_ids"]) + 1 for d in docs]  # + EOS
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "docs.jsonl"
        data_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

        peak_dtype = torch.bfloat16 if args.bf16 else torch.float32
        peak_before = matmul_peak(device, peak_dtype)
        model = build_model(tokenizer, args.max_length, args.seed, args.preset)
        n_params = count_parameters(model)
        ref = reference_loop(model, tokenizer, docs, args, device)
        engines = {}
        for mode in modes:
            model = build_model(tokenizer, args.max_length, args.seed, args.preset)
            engines[mode] = engine_loop(model, tokenizer, data_file, args, device, mode)
        peak_after = matmul_peak(device, peak_dtype)
    eng = engines[modes[0]]
    names = {"reference": "reference", **{f"engine:{m}": f"engine {m}" for m in modes}}
    # On a shared machine the attainable rate moves with the load: take the higher of the two
    # measurements (the conservative choice for MFU).
    peak = max(peak_before, peak_after)

    cfg = model.config
    attn_per_token = 12 * cfg.num_hidden_layers * args.max_length * cfg.hidden_size
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info
                   if line.startswith("model name"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    summary = {
        "machine": {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads":
                    torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__,
                    "load_average": [round(x, 2) for x in load]},
        "setup": {"preset": args.preset, "parameters": n_params, "device": str(device),
                  "dtype": "bf16 autocast" if args.bf16 else "fp32",
                  "batch_size": args.batch_size, "max_length": args.max_length,
                  "timed_steps": args.steps, "documents": len(docs),
                  "mean_doc_tokens": sum(lengths) / len(lengths),
                  "min_doc_tokens": min(lengths), "max_doc_tokens": max(lengths)},
        "peak_matmul_flops": peak, "peak_before": peak_before, "peak_after": peak_after,
        "reference": ref, "engine": eng, **{f"engine:{m}": e for m, e in engines.items()},
        "speedup": eng["tokens_per_s"] / ref["tokens_per_s"],
    }
    for name in names:
        r = summary[name]
        r["mfu"] = 6 * n_params * r["tokens_per_s"] / peak
        # the padded loop computes on padding too: its hardware utilisation counts all slots
        slots = r["tokens_per_s"] / (1 - r["padding_fraction"])
        r["hardware_utilisation"] = 6 * n_params * slots / peak
        r["mfu_incl_attention"] = (6 * n_params + attn_per_token) * r["tokens_per_s"] / peak

    m, s = summary["machine"], summary["setup"]
    print(f"machine: {m['cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']})"
          + (f", GPU {gpu}" if gpu else "") + f", torch {m['torch']}, load average "
          f"{' '.join(str(x) for x in m['load_average'])}")
    print(f"model: preset {s['preset']}, {n_params / 1e6:.2f}M parameters, {s['dtype']} on "
          f"{s['device']}; batch {s['batch_size']} x {s['max_length']} tokens, "
          f"{s['timed_steps']} timed steps")
    print(f"data: {s['documents']} documents, {s['min_doc_tokens']}-{s['max_doc_tokens']} "
          f"tokens (mean {s['mean_doc_tokens']:.1f}); padded to {s['max_length']}, "
          f"{ref['padding_fraction']:.1%} of the reference loop's slots are padding")
    print(f"measured {'bf16' if args.bf16 else 'fp32'} matmul peak: {peak / 1e9:,.1f} GFLOP/s "
          f"(before the loops {peak_before / 1e9:,.1f}, after {peak_after / 1e9:,.1f})")
    print()
    print(f"{'loop':<18} {'tokens/s':>12} {'padding':>8} {'MFU':>7} {'MFU+attn':>9} "
          f"{'HW util':>8} {'final loss':>11}")
    for name, shown in names.items():
        r = summary[name]
        print(f"{shown:<18} {r['tokens_per_s']:>12,.0f} {r['padding_fraction']:>8.1%} "
              f"{r['mfu']:>7.1%} {r['mfu_incl_attention']:>9.1%} "
              f"{r['hardware_utilisation']:>8.1%} {r['final_loss']:>11.3f}")
    print()
    print(f"engine ({modes[0]}) / reference throughput (real tokens/s): "
          f"{summary['speedup']:.2f}x (target >= 2x)")
    for mode in modes[1:]:
        ratio = eng["tokens_per_s"] / engines[mode]["tokens_per_s"]
        summary[f"{modes[0]}_over_{mode}"] = ratio
        print(f"engine {modes[0]} / engine {mode}: {ratio:.2f}x")
    print(f"engine MFU against the measured matmul peak: {eng['mfu']:.1%} (target >= 50%)")
    if args.json:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
