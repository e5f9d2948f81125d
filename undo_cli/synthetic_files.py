"""A built-in synthetic task on disk: its JSON Lines files, `info.json` and `undo.json`,
written atomically (shared by `undo data arithmetic` and `undo data facts`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INFO_NAME = "info.json"


@dataclass
class TaskData:
    """A generated task: records per file key (the keys of the task's `FILES`) plus the
    `info.json` payload (its `options` included)."""

    records: dict[str, list[dict[str, Any]]]
    info: dict[str, Any] = field(default_factory=dict)


def write_task(directory: str | Path, files: dict[str, str],
               records: dict[str, list[dict[str, Any]]], info: dict[str, Any], *,
               ascii_only: bool = True) -> dict[str, Path]:
    """Write `records[key]` as JSON Lines (ASCII, or UTF-8 with `ascii_only=False`) to
    `directory / files[key]` for every key, and `info` to `info.json`, into an existing
    directory; their paths (keys of `files`, plus `info`)."""
    directory = Path(directory)
    encoding = "ascii" if ascii_only else "utf-8"
    paths: dict[str, Path] = {}
    for key, name in files.items():
        paths[key] = directory / name
        with open(paths[key], "w", encoding=encoding, newline="\n") as f:
            for rec in records[key]:
                f.write(json.dumps(rec, ensure_ascii=ascii_only) + "\n")
    paths["info"] = directory / INFO_NAME
    paths["info"].write_text(json.dumps(info, indent=2, ensure_ascii=ascii_only) + "\n",
                             encoding=encoding)
    return paths


def generate_task(out_dir: str | Path, task: str, files: dict[str, str], data: TaskData, *,
                  overwrite: bool, started: float, ascii_only: bool = True) -> dict[str, Path]:
    """Write `data` into `out_dir` atomically with its
    manifest; the final paths (keys of `files`, plus `info`)."""
    from undo_cli.checkpoint import atomic_output, build_manifest, write_manifest

    out_dir = Path(out_dir)
    opts = data.info["options"]
    with atomic_output(out_dir, overwrite=overwrite) as tmp:
        write_task(tmp, files, data.records, data.info, ascii_only=ascii_only)
        write_manifest(tmp, build_manifest(
            "data", arguments={"task": task, **opts}, seed=opts["seed"],
            wall_time_s=time.time() - started,
            extra={"data": {"task": task, "info": INFO_NAME,
                            "records": {files[k]: len(v) for k, v in data.records.items()}}},
        ))
    paths = {key: out_dir / name for key, name in files.items()}
    paths["info"] = out_dir / INFO_NAME
    return paths
