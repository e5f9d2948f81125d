"""Atomic output directories: everything is written to a hidden sibling, then renamed."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from undo_cli.errors import UndoError, UsageError

TMP_MARK = ".undo-tmp-"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
NOT_CARRIED = {"undo.json", "train_log.jsonl", "adapter_config.json"}


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_path(out: str | Path, *, inputs: Iterable[str | Path] = (),
                      overwrite: bool = False) -> Path:
    """Refuse an output path that would clobber data: raise `UsageError` saying why.

    Refused: an existing file; a non-empty directory without `overwrite`; a path inside an
    input, equal to one, or containing one (overwriting it would delete the input).
    """
    out = Path(out)
    resolved = out.resolve()
    for inp in inputs:
        inp_resolved = Path(inp).resolve()
        if _is_within(resolved, inp_resolved):
            raise UsageError(f"output {out} lies inside input {inp}: choose a path outside it")
        if _is_within(inp_resolved, resolved):
            raise UsageError(f"output {out} contains input {inp}: choose another output path")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"output {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise UsageError(f"output directory {out} exists and is not empty; "
                             "pass --overwrite to replace it")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temp siblings left by killed runs (their process no longer exists)."""
    prefix = f".{out.name}{TMP_MARK}"
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        try:
            pid = int(entry.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_output(out: str | Path, *, inputs: Iterable[str | Path] = (),
                  overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block completes.

    On any exception (or Ctrl-C / SIGTERM) the temporary directory is deleted and `out` is
    left as it was; a `kill -9` leaves only a hidden `.NAME.undo-tmp-PID-*` sibling, removed
    by the next run. With `overwrite`, an existing `out` is replaced in one rename.
    """
    out = check_output_path(out, inputs=inputs, overwrite=overwrite)
    created_parents = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    token = secrets.token_hex(4)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{token}"
    try:
        tmp.mkdir()
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.undo-old-{token}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created_parents)
        if is_disk_full(e):
            raise UndoError(f"no space left on the device while writing {out}; "
                            "nothing was written") from e
        raise


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


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            break


def is_weight_file(name: str) -> bool:
    """Weights and their index files: never copied blindly between checkpoints."""
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES


def copy_support_files(src: str | Path, dst: str | Path, *, skip_existing: bool = True) -> None:
    """Carry config, generation config, tokenizer and other small files from `src` to `dst`.

    Weight files, their indexes and undo's own manifest and logs are not copied.
    """
    src, dst = Path(src), Path(dst)
    for entry in sorted(src.iterdir()):
        if not entry.is_file() or is_weight_file(entry.name) or entry.name in NOT_CARRIED:
            continue
        target = dst / entry.name
        if skip_existing and target.exists():
            continue
        shutil.copy2(entry, target)


def save_model(model, tokenizer, directory: str | Path, *, source: str | Path | None = None,
               max_shard_size: str | int = "5GB") -> None:
    """Write `model` (safetensors) and `tokenizer` into `directory`, plus `source`'s extra files.

    A PEFT-wrapped model is merged first, so the result loads with plain `from_pretrained`.
    """
    directory = Path(directory)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if source is not None:
        copy_support_files(source, directory)
