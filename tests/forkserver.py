"""A warm `undo` for the example scripts' smoke tests (tests/e2e/test_pipeline.py).

One server process imports torch, transformers and every stage once; each `undo ...` of a
script then runs in a fresh child forked from it, so a pipeline of thirty commands pays the
import (about 3 s of CPU each) once. Every command still runs in a process of its own through
the console entry point (`undo_cli.cli:main`) with its own argv, working directory,
environment, standard streams (the client's, passed over the socket) and exit status; what it
skips is only the interpreter's start-up and the imports, which tests/e2e/test_startup.py and
the other subprocess tests check.

The example scripts call `$UNDO` when it is set: `UNDO="python tests/forkserver.py client
SOCKET"` (`UndoServer.command`). Run as `python tests/forkserver.py serve SOCKET` for the
server (it prints `ready` once it listens), `... client SOCKET ARGS...` for one command,
`... script SOCKET FILE ARGS...` for `python FILE ARGS...` (a test's runner around `undo`, or
a worker under a launcher: `torchrun ... tests/forkserver.py script SOCKET FILE ARGS`). The
client forwards SIGINT and SIGTERM to the command's process, and exits with its status (137,
as after `kill -9`, when that process ended without reporting one); a command whose client
goes away (killed) is killed too. `UNDO_FORKSERVER_LOG=FILE` in a command's environment makes
it append a line to FILE: its arguments, wall time and CPU time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What the commands import lazily, imported once in the server (a missing optional one is
# skipped). Nothing here starts a thread: the server forks, so it must hold only one.
WARM = ("torch", "transformers", "safetensors.torch", "accelerate", "numpy",
        "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
        "transformers.models.qwen2.modeling_qwen2", "transformers.models.gemma2.modeling_gemma2",
        "transformers.models.mistral.modeling_mistral", "transformers.models.phi3.modeling_phi3",
        "transformers.models.gpt_neox.modeling_gpt_neox",
        "undo_cli.cli", "undo_cli.training", "undo_cli.unlearn", "undo_cli.distill",
        "undo_cli.relearn", "undo_cli.evaluation", "undo_cli.report", "undo_cli.probe",
        "undo_cli.perturb", "undo_cli.synthetic_files", "undo_cli.synthetic_mc",
        "undo_cli.plots", "undo_cli.matrix", "undo_cli.layers", "undo_cli.cli.helptext",
        "matplotlib.pyplot", "PIL.PngImagePlugin", "pydantic.main", "pydantic.fields",
        "pydantic.types", "blake3", "rich.table", "multiprocessing")
STREAMS = (0, 1, 2)


def serve(path: str) -> None:
    """Import everything, listen on the Unix socket `path`, fork a child per connection."""
    import importlib

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `undo` sets it before torch loads
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in WARM:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _warm_caches()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            _run_command(conn)  # never returns
        conn.close()
        try:  # reap the commands that have finished
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


def _warm_caches() -> None:
    """What every command would otherwise build again in its first moments (about half a
    second of CPU each): transformers' table of checkpoint conversions (a thousand regular
    expressions, built on the first model load) and matplotlib's first figure. Neither runs a
    model nor starts a thread."""
    import io

    with contextlib.suppress(ImportError, AttributeError):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")
    with contextlib.suppress(ImportError):
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(2, 2))
        axes.plot([0, 1], [0, 1], marker="o", label="warm")
        axes.set_xlabel("step")
        axes.legend()
        figure.tight_layout()
        figure.savefig(io.BytesIO(), format="png")
        plt.close(figure)


def _receive(conn: socket.socket) -> dict:
    head, fds, _, _ = socket.recv_fds(conn, 4, len(STREAMS))
    size = struct.unpack("!I", head)[0]
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the client went away")
        body += chunk
    request = json.loads(body)
    for fd, target in zip(fds, request["streams"]):
        os.dup2(fd, target)
        os.close(fd)
    return request


def _run_command(conn: socket.socket) -> None:
    """In the forked child: become the client's `undo ARGS...`, report the exit status."""
    code = 1
    started = time.perf_counter()
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        request = _receive(conn)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        script = request.get("script")
        sys.argv = [script, *request["argv"]] if script else ["undo", *request["argv"]]
        _threads_from_environment()
        _die_with_the_client(conn)
        conn.sendall(f"{os.getpid()}\n".encode())
        try:
            if script:  # as `python SCRIPT ARGS...` would
                import runpy

                sys.path[0] = os.path.dirname(os.path.abspath(script))
                runpy.run_path(script, run_name="__main__")
            else:
                from undo_cli.cli import main

                main()
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception would be
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        _log_usage(started)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        with contextlib.suppress(OSError):
            conn.sendall(f"exit {code}\n".encode())
        os._exit(code)


def _die_with_the_client(conn: socket.socket) -> None:
    """Kill this process when its client goes away before the command reported (the client
    was killed: a launcher stopping its workers, a test's teardown), as the process a real
    `undo` would have been dies with it. A thread that only waits on the connection, with
    every signal blocked, so that signals still go to the command's threads."""
    import threading

    ready = threading.Event()

    def watch() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        ready.set()
        with contextlib.suppress(OSError):
            if conn.recv(1):
                return  # never sent: the client only reads
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="forkserver-client-watch").start()
    ready.wait()


def _log_usage(started: float) -> None:
    log = os.environ.get("UNDO_FORKSERVER_LOG")
    if not log:
        return
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    with contextlib.suppress(OSError), open(log, "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "wall": time.perf_counter() - started,
                            "cpu": u.ru_utime + u.ru_stime}) + "\n")


def _threads_from_environment() -> None:
    """torch's threads as a fresh process would take them from OMP_NUM_THREADS (read when
    torch loaded, in the server, whose environment may differ from the command's)."""
    import torch

    count = os.environ.get("OMP_NUM_THREADS", "").strip()
    if count.isdigit() and int(count) > 0:
        torch.set_num_threads(int(count))
    elif hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))


def client(path: str, argv: list[str], script: str | None = None) -> int:
    """Run `undo ARGV` (or `python SCRIPT ARGV`) in the server as this process would: its
    exit status."""
    streams = [fd for fd in STREAMS if _is_open(fd)]
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                       "streams": streams, "script": script}).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    socket.send_fds(sock, [struct.pack("!I", len(body))], streams)
    sock.sendall(body)
    replies = sock.makefile("rb")
    pid = int(replies.readline())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _frame: os.kill(pid, s))
    last = replies.readline().split()
    if len(last) != 2 or last[0] != b"exit":  # killed before it could report
        return 128 + signal.SIGKILL
    return int(last[1])


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class UndoServer:
    """The server as a context manager: `with UndoServer(tmp) as server: env["UNDO"] =
    server.command`."""

    def __init__(self, directory: Path):
        # A socket's path has at most 104-108 bytes: a short directory where the given one is
        # long (macOS's temporary directories).
        if len(str(directory)) > 80 and Path("/tmp").is_dir():
            directory = tempfile.mkdtemp(prefix="undo-", dir="/tmp")
        self.socket = Path(directory) / "undo.sock"
        self.argv = [sys.executable, str(Path(__file__).resolve()), "client", str(self.socket)]
        self.command = " ".join(self.argv)  # what a script's `$UNDO "$@"` splits
        # `[*server.script, FILE, ARGS...]` runs `python FILE ARGS...` in the server; after a
        # launcher's options, `server.script[1:]` is the script and arguments it runs.
        self.script = [sys.executable, str(Path(__file__).resolve()), "script", str(self.socket)]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> UndoServer:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve", str(self.socket)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)
        ready = self.process.stdout.readline().strip()
        if ready != "ready":
            self.process.kill()
            raise RuntimeError(f"the undo fork server did not start ({ready!r})")
        return self

    def __exit__(self, *exc) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "script":
        sys.exit(client(sys.argv[2], sys.argv[4:], script=os.path.abspath(sys.argv[3])))
    else:
        sys.exit(client(sys.argv[2], sys.argv[3:]))
