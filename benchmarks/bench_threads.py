"""Thread settings of the CLI: OpenMP's wait policy and the thread count, alone and with a
second training sharing the cores (what the demo did when it trained base and oracle side by
side with 2 threads each on 2 cores).

Each configuration runs `undo train` on the arithmetic data (tiny preset, batch 32, max length
64) for STEPS steps; the side-by-side ones start two such trainings at once and time the
slower. Repetitions are interleaved so that a change of the machine's load hits every
configuration alike. Prints wall seconds per configuration and the ratio to the first.

    python benchmarks/bench_threads.py [--steps 150] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [  # (label, threads per process, OMP_WAIT_POLICY, processes side by side)
    ("1 process, 2 threads, PASSIVE", 2, "PASSIVE", 1),
    ("1 process, 2 threads, ACTIVE", 2, "ACTIVE", 1),
    ("1 process, 1 thread", 1, "PASSIVE", 1),
    ("2 side by side, 2 threads each, PASSIVE", 2, "PASSIVE", 2),
    ("2 side by side, 2 threads each, ACTIVE", 2, "ACTIVE", 2),
    ("2 side by side, 1 thread each", 1, "PASSIVE", 2),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    undo = [sys.executable, "-m", "undo_cli"]
    subprocess.run([*undo, "data", "arithmetic", str(work / "data"), "--overwrite"],
                   check=True, capture_output=True)
    times: dict[str, list[float]] = {label: [] for label, *_ in CONFIGS}
    for _ in range(args.repeats):
        for label, threads, policy, processes in CONFIGS:
            env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": str(threads)}
            started = time.perf_counter()
            running = [subprocess.Popen(
                [*undo, "--threads", str(threads), "train", str(work / f"m{i}"), "--init",
                 "tiny", "--data", str(work / "data" / "retain_train.jsonl"), "--max-steps",
                 str(args.steps), "--batch-size", "32", "--max-length", "64", "--overwrite",
                 "--quiet"], env=env) for i in range(processes)]
            if any(p.wait() != 0 for p in running):
                raise SystemExit(f"{label}: a training failed")
            times[label].append(time.perf_counter() - started)
    first = min(times[CONFIGS[0][0]])
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {args.steps} steps, "
          f"best of {args.repeats}")
    for label, *_ in CONFIGS:
        best = min(times[label])
        print(f"{label:42s} {best:7.1f} s  x{best / first:.2f}")


if __name__ == "__main__":
    main()
