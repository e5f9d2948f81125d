"""Output directories: checked against every input, locked, written aside and swapped in.

- `check_output_path` refuses, before any work, an output that would clobber data: an
  existing file, a non-empty directory without `--overwrite`, a path inside an input, equal
  to one or containing one, any other path the command reads (`--data`, `--eval`,
  `--cache-teacher`, `--state-dir`) inside OUT, and a name too long for the temporary
  siblings undo puts beside it. A symbolic link as OUT stands for the directory it points to.
- `atomic_output` holds OUT's lock (`undo_cli.checkpoint.lock`), writes into a hidden
  sibling `.NAME.undo-tmp-PID-TOKEN` and renames it into place; with `--overwrite` the old
  output is swapped out in one atomic step (`renameat2(RENAME_EXCHANGE)`, else two renames)
  and removed. Temporaries of runs whose process is gone are removed (and an old output
  hidden by an interrupted two-rename swap is put back) at the next run, with a note.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from undo_cli.checkpoint.lock import (
    hold_output,
    mark_committed,
    output_lock,
    remove_empty_dirs,
)
from undo_cli.checkpoint.swap import exchange, signals_deferred
from undo_cli.errors import UndoError, UsageError
from undo_cli.options import SaveOptions
from undo_cli.options.paths import current_reads

log = logging.getLogger(__name__)

TMP_MARK = ".undo-tmp-"
OLD_MARK = ".undo-old-"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
NOT_CARRIED = {"undo.json", "train_log.jsonl", "adapter_config.json"}
# Bytes undo adds to OUT's name for its siblings: `.NAME.undo-tmp-PID-TOKEN`,
# `.NAME.undo-old-PID-TOKEN`, `.NAME.undo-lock`, `NAME.undo-state`.
SIBLING_BYTES = 32

__all__ = ["ONE_FILE", "Layout", "atomic_output", "check_output_path", "copy_support_files",
           "hold_output", "is_disk_full", "is_weight_file", "real_output", "save_layout",
           "save_model"]


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _resolved(path: str | Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise UsageError(f"{path}: cannot resolve the path ({e})") from e


def real_output(out: str | Path) -> Path:
    """OUT itself, or the directory a symbolic link OUT points to (the output replaces that
    directory and the link keeps pointing at it); `UsageError` for a dangling or looping
    link."""
    out = Path(out)
    if not out.is_symlink():
        return out
    target = _resolved(out)
    if not target.exists():
        raise UsageError(f"output {out} is a symbolic link to {target}, which does not exist")
    return target


def _check_name(out: Path) -> None:
    name = out.absolute().name
    if not name or name in (".", ".."):
        raise UsageError(f"output {out}: give the directory by its name (the run replaces "
                         "OUT by renaming a directory into its place)")
    existing = next((p for p in out.absolute().parents if p.is_dir()), Path("/"))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    size = len(os.fsencode(name))
    if size + SIBLING_BYTES > limit:
        raise UsageError(f"output name {name[:40]}... is too long ({size} bytes): undo puts "
                         f"siblings such as .NAME.undo-tmp-* beside it, so it may have at "
                         f"most {limit - SIBLING_BYTES} bytes here")


def _check_reads(reads: Iterable[tuple[str, str | Path]], out: Path, resolved: Path) -> None:
    for flag, path in reads:
        if _is_within(_resolved(path), resolved):
            raise UsageError(f"{flag} {path} lies inside the output {out}, which the run "
                             "replaces: move it out of OUT or choose another OUT")


def check_output_path(out: str | Path, *, inputs: Iterable[str | Path] = (),
                      reads: Iterable[tuple[str, str | Path]] = (),
                      overwrite: bool = False) -> Path:
    """Refuse an output path that would clobber data: raise `UsageError` saying why (see the
    module docstring); returns OUT (a symbolic link's target). Inside a command, OUT's lock
    is then taken for the rest of the command (`hold_output`).

    `inputs` are checkpoints (or results directories) the command reads: OUT may not lie in
    one, be one or contain one. `reads` are `(flag, path)` of every other path it reads or
    writes besides OUT: none may lie inside OUT or be OUT; nor may any path-typed option the
    running command declared (`undo_cli.options.paths`).
    """
    out = real_output(out)
    _check_name(out)
    resolved = _resolved(out)
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted
        cwd = None
    if cwd is not None and out.exists() and _is_within(cwd, resolved):
        raise UsageError(f"output {out} is the working directory or holds it: the run "
                         "replaces OUT as a whole, so run it from outside OUT")
    declared = current_reads()  # options first, so that the message names the flag
    options = [(flag, path) for flag, path in declared if flag.startswith("-")]
    _check_reads(options, out, resolved)
    for inp in inputs:
        inp_resolved = _resolved(inp)
        if _is_within(resolved, inp_resolved):
            raise UsageError(f"output {out} lies inside input {inp}: choose a path outside it")
        if _is_within(inp_resolved, resolved):
            raise UsageError(f"output {out} contains input {inp}: choose another output path")
    _check_reads([*reads, *(r for r in declared if r not in options)], out, resolved)
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise UsageError(f"output directory {out} exists and is not empty; "
                             "pass --overwrite to replace it")
    hold_output(out)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _owner(entry: Path, prefix: str) -> int | None:
    """The pid in `.NAME.undo-tmp-PID-TOKEN` (None if the name does not parse)."""
    try:
        return int(entry.name[len(prefix):].split("-")[0])
    except ValueError:
        return None


def remove_stale_temporaries(out: Path) -> None:
    """Clean up after runs that were killed (their process no longer exists): delete their
    temporary directories, and put back an old output that an interrupted two-rename
    `--overwrite` left hidden (when OUT is missing); each with a note."""
    if not out.parent.is_dir():
        return
    tmp_prefix, old_prefix = f".{out.name}{TMP_MARK}", f".{out.name}{OLD_MARK}"
    for entry in sorted(out.parent.iterdir()):
        for prefix in (tmp_prefix, old_prefix):
            if not entry.name.startswith(prefix):
                continue
            pid = _owner(entry, prefix)
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                continue
            if prefix == old_prefix and not out.exists() and not out.is_symlink():
                os.replace(entry, out)
                log.warning("note: put back %s from %s: an earlier --overwrite (pid %d) was "
                            "interrupted while replacing it", out, entry.name, pid)
                continue
            shutil.rmtree(entry, ignore_errors=True)
            log.info("note: removed %s, left by an interrupted run (pid %d is gone)",
                     entry.name, pid)


def _commit(tmp: Path, out: Path, token: str, done: list[Path]) -> None:
    """Put `tmp` in place as `out`, replacing an existing `out` atomically where possible
    (`done` gets `out` once it is in place); SIGINT/SIGTERM wait until `out` is complete."""
    old = None
    with signals_deferred():
        if not out.exists():
            os.replace(tmp, out)
        elif exchange(tmp, out):  # `tmp` now holds the old output
            old = tmp
        else:
            old = out.parent / f".{out.name}{OLD_MARK}{os.getpid()}-{token}"
            os.replace(out, old)
            os.replace(tmp, out)
        done.append(out)
        mark_committed(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output(out: str | Path, *, inputs: Iterable[str | Path] = (),
                  reads: Iterable[tuple[str, str | Path]] = (),
                  overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block completes.

    On any exception (or Ctrl-C / SIGTERM) the temporary directory is deleted and `out` is
    left as it was; a `kill -9` leaves only a hidden `.NAME.undo-tmp-PID-*` sibling, removed
    by the next run. OUT's lock is held throughout. With `overwrite`, an existing `out` is
    replaced in one atomic exchange (two renames where the platform has none).
    """
    inputs, reads = list(inputs), list(reads)
    out = real_output(out)
    with output_lock(out):
        remove_stale_temporaries(out)
        out = check_output_path(out, inputs=inputs, reads=reads, overwrite=overwrite)
        created_parents = [p for p in reversed(out.absolute().parents) if not p.exists()]
        out.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(4)
        tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{token}"
        done: list[Path] = []
        try:
            tmp.mkdir()
            yield tmp
            follow_umask(tmp)
            _commit(tmp, out, token, done)
        except BaseException as e:
            if not done:
                shutil.rmtree(tmp, ignore_errors=True)
                remove_empty_dirs(created_parents)
            if is_disk_full(e):
                raise UndoError(f"no space left on the device while writing {out}; "
                                "nothing was written") from e
            raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file beside `path` that replaces `path` only if the block completes
    (one file's `atomic_output`: an interrupted or failed write leaves `path` as it was)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if is_disk_full(e):
            raise UndoError(f"no space left on the device while writing {path}; nothing was "
                            "written") from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "(os error 28)",
                   "(os error 122)")


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when a library wrapped it (safetensors raises a
    `SafetensorError` saying "No space left on device (os error 28)")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error).lower() for text in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set
    and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory: str | Path) -> None:
    """Give every weight file under `directory` (or that file) the mode a new file gets
    (0666 less the umask), as every other file undo writes has: safetensors writes its files
    with 0600 whatever the umask, so teammates and CI users could not read a checkpoint."""
    mode = 0o666 & ~current_umask()
    root = Path(directory)
    for path in [root] if root.is_file() else root.rglob("*"):
        if (is_weight_file(path.name) and path.is_file() and not path.is_symlink()
                and path.stat().st_mode & 0o777 != mode):
            path.chmod(mode)


def is_weight_file(name: str) -> bool:
    """Weights and their index files: never copied blindly between checkpoints."""
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES


def copy_support_files(src: str | Path, dst: str | Path, *, skip_existing: bool = True) -> None:
    """Carry config, generation config, tokenizer and other small files from `src` to `dst`.

    Weight files, their indexes and undo's own manifest and logs are not copied; nor is an
    adapter's model card (README.md, PEFT's `library_name: peft`): the output is a full
    model, not an adapter.
    """
    src, dst = Path(src), Path(dst)
    adapter = (src / "adapter_config.json").is_file()
    for entry in sorted(src.iterdir()):
        if not entry.is_file() or is_weight_file(entry.name) or entry.name in NOT_CARRIED:
            continue
        if adapter and entry.name == "README.md":
            continue
        target = dst / entry.name
        if skip_existing and target.exists():
            continue
        shutil.copy2(entry, target)


ONE_FILE = 1 << 50  # a shard size no model reaches: all weights in model.safetensors


@dataclass(frozen=True)
class Layout:
    """How a model is written: the dtype of its weights (torch's name) and the largest shard
    in bytes (`ONE_FILE`: one file)."""

    dtype: str = "float32"
    max_shard_size: int = ONE_FILE


def save_layout(save: SaveOptions = SaveOptions(), source=None) -> Layout:
    """The `Layout` of an output: `--save-dtype` / `--max-shard-size` where given, else the
    input checkpoint's (`source`, a `CheckpointInfo`; an adapter's base): a bf16 model stays
    bf16, a model in 3 shards of 2 GB is written in shards of that size (scaled when the
    dtype changes); a new model (no `source`) is fp32 in one file."""
    stored = source.stored_dtype() if source is not None else None
    dtype = save.save_dtype if save.save_dtype != "auto" else stored or "float32"
    if save.max_shard_size is not None:
        return Layout(dtype, save.max_shard_size.bytes)  # parsed when `save` was built
    largest = source.largest_shard_bytes() if source is not None else None
    if largest is None:
        return Layout(dtype, ONE_FILE)
    ratio = _itemsize(dtype) / _itemsize(stored or dtype)
    return Layout(dtype, max(1, int(largest * ratio)))


def _itemsize(dtype: str) -> int:
    return {"float64": 8, "float32": 4}.get(dtype, 2)


def save_model(model, tokenizer, directory: str | Path, *, source: str | Path | None = None,
               layout: Layout = Layout()) -> None:
    """Write `model` (safetensors) and `tokenizer` into `directory`, plus `source`'s extra files.

    A PEFT-wrapped model is merged first, so the result loads with plain `from_pretrained`.
    The weights are written in `layout`'s dtype and shard size (default: fp32, one file)
    without changing `model` itself; config.json records the dtype written.
    """
    import torch

    directory = Path(directory)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    dtype = getattr(torch, layout.dtype)
    state_dict = None
    if any(p.is_floating_point() and p.dtype != dtype for p in model.state_dict().values()):
        converted: dict[tuple, torch.Tensor] = {}  # tied tensors stay one tensor

        def convert(t: torch.Tensor) -> torch.Tensor:
            if not t.is_floating_point():
                return t
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                   tuple(t.stride()))
            if key not in converted:
                converted[key] = t.detach().to(dtype)
            return converted[key]

        state_dict = {k: convert(v) for k, v in model.state_dict().items()}
    model.save_pretrained(directory, max_shard_size=layout.max_shard_size,
                          state_dict=state_dict)
    if state_dict is not None:  # transformers records the model's dtype, not the one written
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = layout.dtype
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if source is not None:
        copy_support_files(source, directory)
