"""Benchmark `undo perturb` against copying the checkpoint and against the naive way.

Generates a Llama checkpoint of at least `--size-gb` GB (fp32 random weights, written with
undo's streaming writer, sharded with an index like a real checkpoint) under /tmp, then
measures side by side, each in its own process (wall time and peak RSS from `wait4`):

- `cp -r SRC DST`: the I/O floor (cp copies inside the kernel);
- `dd bs=8M` per file: a copy through user space, which any tool that changes the bytes pays;
- `python -m undo_cli perturb SRC DST --alpha 0.6 --beta 0.1`;
- the naive way: `from_pretrained`, a loop over the parameters adding Xavier noise in place,
  `save_pretrained`.

The page cache is warmed first (one untimed copy), outputs are deleted and `sync`ed between
runs, and the median of `--repeat` runs is reported, with the fastest runs beside it: on the
shared VM this was written on, page-cache writes stall at random (cp and dd too, by up to
2.7 s for 1.1 GB, all kernel time), so the medians measure the VM as much as the code.
The floor is the copy plus drawing the random numbers on two cores (the single-core rate is
measured here). Targets (from the issue): perturb at most 4x the copy and at least 3x faster
than the naive way; peak RSS at most 2x the largest tensor plus 400 MB.

    python benchmarks/bench_perturb.py [--size-gb 1.1] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAIVE = r"""
import sys, torch
from transformers import AutoModelForCausalLM
src, dst, alpha, beta = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
with torch.no_grad():
    for p in model.parameters():
        if p.ndim == 2:
            noise = torch.nn.init.xavier_uniform_(torch.empty_like(p))
            p.mul_(1 - alpha).add_(noise, alpha=alpha * beta)
        else:
            p.mul_(1 - alpha)
model.save_pretrained(dst)
"""


def uptime() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def make_checkpoint(path: Path, size_gb: float) -> dict:
    """A random fp32 Llama checkpoint of at least `size_gb` GB (streamed to disk)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from undo_cli.checkpoint.safetensors_io import (
        SafetensorsWriter,
        TensorSpec,
        file_order,
        natural_key,
        shard_file_names,
        split_shards,
        write_index,
    )

    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 4 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    fixed = 4 * (2 * vocab * hidden + hidden)
    layers = max(1, math.ceil((size_gb * 1e9 - fixed) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=16, tie_word_embeddings=False,
                         max_position_embeddings=2048)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  AutoModelForCausalLM.from_config(config).state_dict().items()}
    path.mkdir(parents=True)
    config.save_pretrained(path)
    specs = sorted((TensorSpec(k, "F32", s, 4 * math.prod(s)) for k, s in shapes.items()),
                   key=lambda s: natural_key(s.name))
    groups = split_shards(specs, 500_000_000)
    names = shard_file_names(len(groups))
    gen = torch.Generator().manual_seed(0)
    for name, group in zip(names, groups):
        with SafetensorsWriter(path / name, file_order(group), {"format": "pt"}) as w:
            for spec in w.specs:
                t = torch.empty(spec.shape)
                if len(spec.shape) == 2:
                    t.uniform_(-0.03, 0.03, generator=gen)
                else:
                    t.fill_(1.0)
                w.write(spec.name, t)
    if len(groups) > 1:
        write_index(path, list(zip(names, groups)))
    largest = max(specs, key=lambda s: s.nbytes)
    return {"layers": layers, "bytes": sum(s.nbytes for s in specs),
            "elements_2d": sum(s.numel for s in specs if len(s.shape) == 2),
            "largest_tensor": largest.name, "largest_bytes": largest.nbytes,
            "files": len(groups)}


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`: its wall time, its own peak RSS (MB, from wait4) and its stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n"
                         f"{stderr[-2000:]}")
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "stdout": stdout,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime}


def single_core_uniform_rate() -> float:
    """Xavier-uniform floats per second that `undo perturb`'s noise generator draws on one
    core (a chunk of `CHUNK_ELEMENTS`, fresh generator each time, as in the real run)."""
    import numpy as np

    from undo_cli.perturb import CHUNK_ELEMENTS, chunk_generator, draw_noise

    out = np.empty(CHUNK_ELEMENTS, dtype=np.float32)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for k in range(16):
            draw_noise(chunk_generator(0, "w", k), "xavier-uniform", 0.1, out)
        best = min(best, time.perf_counter() - start)
    return 16 * CHUNK_ELEMENTS / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.1,
                        help="checkpoint size in GB (at least 1 for the recorded figures)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of cp and perturb")
    parser.add_argument("--naive-repeat", type=int, default=1, help="runs of the naive way")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--dd", action="store_true",
                        help="also time dd bs=8M per file (a copy through user space)")
    parser.add_argument("--workdir", default=None, help="where to generate (default /tmp)")
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:  # child mode: build the checkpoint, measure the RNG, report as JSON
        info = make_checkpoint(Path(args.generate), args.size_gb)
        info["rate"] = single_core_uniform_rate()
        print(json.dumps(info))
        return

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    work = Path(tempfile.mkdtemp(prefix="undo-bench-perturb-", dir=args.workdir))
    load_before = uptime()
    try:
        # This process never imports torch: a child forked from a big parent would report
        # the parent's memory as its own peak RSS.
        src = work / "src"
        generated = run([sys.executable, __file__, "--generate", str(src),
                         "--size-gb", str(args.size_gb)], env=env)
        ckpt, gen_s = json.loads(generated["stdout"]), generated["wall_s"]
        rate = ckpt["rate"]

        def fresh(name: str) -> Path:
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            return out

        # Warm the page cache (input read, output pages allocated) with one untimed copy.
        run(["cp", "-r", str(src), str(fresh("warm"))])
        shutil.rmtree(work / "warm")

        # cp copies inside the kernel (copy_file_range); dd passes every byte through user
        # space once in each direction, as any tool that transforms the data must.
        dd = ("mkdir -p \"$2\" && for f in \"$1\"/*; do dd if=\"$f\" "
              "of=\"$2/$(basename \"$f\")\" bs=8M status=none; done")
        results: dict[str, list[dict]] = {"cp": [], "dd": [], "perturb": [], "naive": []}
        for i in range(max(args.repeat, args.naive_repeat)):
            if i < args.repeat:
                results["perturb"].append(run(
                    [sys.executable, "-m", "undo_cli", "perturb", str(src),
                     str(fresh("perturb")), "--alpha", "0.6", "--beta", "0.1", "--quiet",
                     "--json"], env=env))
                results["cp"].append(run(["cp", "-r", str(src), str(fresh("cp"))]))
                if args.dd:
                    results["dd"].append(run(["sh", "-c", dd, "dd", str(src),
                                              str(fresh("dd"))]))
            if i < args.naive_repeat:
                results["naive"].append(run(
                    [sys.executable, "-c", NAIVE, str(src), str(fresh("naive")), "0.6", "0.1"],
                    env=env))
        # Context: what every `undo perturb` pays besides the streaming itself.
        startup = run([sys.executable, "-m", "undo_cli", "--version"], env=env)
        fingerprint = run([sys.executable, "-c", "import sys, time; "
                           "from undo_cli.checkpoint.manifest import fingerprint; "
                           "t = time.perf_counter(); fingerprint(sys.argv[1]); "
                           "print(time.perf_counter() - t)", str(src)], env=env)
        load_after = uptime()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(key: str, field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    if not results["dd"]:
        del results["dd"]
    cp_s, pt_s, nv_s = (median(k, "wall_s") for k in ("cp", "perturb", "naive"))
    dd_s = median("dd", "wall_s") if "dd" in results else math.nan
    in_process = statistics.median(
        json.loads(r["stdout"])["wall_time_s"] for r in results["perturb"])
    floor = cp_s + ckpt["elements_2d"] / (2 * rate)
    rss_limit = 2 * ckpt["largest_bytes"] / 2**20 + 400
    report = {
        "checkpoint_gb": ckpt["bytes"] / 1e9, "layers": ckpt["layers"],
        "files": ckpt["files"], "largest_tensor": ckpt["largest_tensor"],
        "largest_tensor_mb": ckpt["largest_bytes"] / 2**20, "generate_s": gen_s,
        "uniform_floats_per_s_one_core": rate, "floor_s": floor,
        "cp_s": cp_s, "dd_s": dd_s, "perturb_s": pt_s, "perturb_in_process_s": in_process,
        "naive_s": nv_s,
        "cp_rss_mb": median("cp", "rss_mb"), "perturb_rss_mb": median("perturb", "rss_mb"),
        "naive_rss_mb": median("naive", "rss_mb"),
        "perturb_over_cp": pt_s / cp_s, "perturb_over_dd": pt_s / dd_s,
        # Fastest runs: this VM stalls page-cache writes at random (cp and dd included, up
        # to 2.7 s for 1.1 GB, all in kernel time); the minimum is what the code costs.
        "best_cp_s": min(r["wall_s"] for r in results["cp"]),
        "best_perturb_s": min(r["wall_s"] for r in results["perturb"]),
        "best_perturb_over_best_cp": (min(r["wall_s"] for r in results["perturb"])
                                      / min(r["wall_s"] for r in results["cp"])),
        "perturb_in_process_over_cp": in_process / cp_s,
        "naive_over_perturb": nv_s / pt_s, "rss_limit_mb": rss_limit,
        "startup_s": startup["wall_s"], "fingerprint_s": float(fingerprint["stdout"]),
        "runs": {k: [round(r["wall_s"], 3) for r in v] for k, v in results.items()},
        "cpu_user_sys": {k: [(round(r["user_s"], 2), round(r["sys_s"], 2)) for r in v]
                         for k, v in results.items()},
        "load_before": load_before, "load_after": load_after, "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"checkpoint: {report['checkpoint_gb']:.2f} GB fp32 Llama, {ckpt['layers']} layers, "
          f"{ckpt['files']} shards; largest tensor {ckpt['largest_tensor']} "
          f"({report['largest_tensor_mb']:.0f} MB)")
    print(f"load average before / after: {load_before} / {load_after} ({os.cpu_count()} cpus)")
    print(f"one core draws {rate / 1e6:.0f}M Xavier-uniform floats/s; floor (copy + noise on 2 "
          f"cores) {floor:.2f} s")
    print(f"{'':28} {'wall s':>8} {'peak RSS MB':>12}   runs")
    for key, label in (("cp", "cp -r (I/O floor)"), ("dd", "dd bs=8M (through user space)"),
                       ("perturb", "undo perturb"),
                       ("naive", "naive (load, loop, save)")):
        if key not in results:
            continue
        print(f"{label:28} {median(key, 'wall_s'):8.2f} {median(key, 'rss_mb'):12.0f}   "
              f"{report['runs'][key]}")
    print(f"{'  perturb, in-process':28} {in_process:8.2f}")
    print(f"{'  start-up (undo --version)':28} {report['startup_s']:8.2f}")
    print(f"{'  undo.json input blake3':28} {report['fingerprint_s']:8.2f}   (overlapped)")
    print(f"fastest runs: perturb {report['best_perturb_s']:.2f} s / cp "
          f"{report['best_cp_s']:.2f} s = {report['best_perturb_over_best_cp']:.1f}x")
    print(f"perturb / cp     = {report['perturb_over_cp']:.1f}x  (target <= 4x; "
          f"in-process {report['perturb_in_process_over_cp']:.1f}x"
          + (f"; perturb / dd = {report['perturb_over_dd']:.1f}x)" if "dd" in results else ")"))
    print(f"naive / perturb  = {report['naive_over_perturb']:.1f}x  (target >= 3x)")
    print(f"perturb peak RSS = {report['perturb_rss_mb']:.0f} MB  (target <= 2 x "
          f"{report['largest_tensor_mb']:.0f} + 400 = {rss_limit:.0f} MB)")


if __name__ == "__main__":
    main()
