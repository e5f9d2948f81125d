"""The files of a saved training state: safetensors for tensors, JSON for everything else,
and nothing that is unpickled.

A state directory `step-NNNNNNNN/` holds exactly:

- `undo-state.json`: undo's marker (written first; only directories carrying it are ever
  loaded or removed);
- `rank-R.json` and `rank-R.safetensors` for each process R: the model's weights and the
  optimizer's state (process 0's only, unless they are sharded: FSDP), the run's counters,
  log and data positions, and the random generators (Python, NumPy, torch CPU and CUDA);
- `complete.json`: the step, the resume key and a fingerprint of every rank file, written
  last (a file changed since is refused on `--resume`).

A state is removed complete.json first (no longer a state to resume) and its marker last, so
that a kill at any moment leaves a directory undo still recognises as its own (`is_ours`)
and never resumes. On `--resume` every tensor must have the shape and dtype of what it is
loaded into, and the step counters (directory name, marker, complete.json, each process's
run state, the optimizer's steps) must agree.

Anything else there (a `custom_checkpoint_0.pkl` from an older version, or planted) is
refused before anything is read. JSON cannot hold tensors, tuples or integer keys, so values
are encoded with tags: `{"__tensor__": KEY}` (the tensor KEY of the safetensors file; an
FSDP shard is `{"__dtensor__": KEY}`), `{"__tuple__": [...]}`, `{"__items__": [[k, v], ...]}`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from undo_cli.checkpoint.manifest import fingerprint_data
from undo_cli.checkpoint.output import follow_umask
from undo_cli.errors import UsageError

MARKER = "undo-state.json"
COMPLETE = "complete.json"
FORMAT = 1
KIND = "undo-training-state"
STATE_NAME = re.compile(r"^(?:\.tmp-)?step-\d{8}$")
RANK_FILE = re.compile(r"^rank-\d+\.(?:json|safetensors)$")


def rank_files(rank: int) -> tuple[str, str]:
    return f"rank-{rank}.json", f"rank-{rank}.safetensors"


def allowed_files(world: int) -> set[str]:
    """The only file names a state directory of a `world`-process run may hold."""
    return {MARKER, COMPLETE} | {name for r in range(world) for name in rank_files(r)}


def write_marker(directory: Path, step: int) -> None:
    (directory / MARKER).write_text(json.dumps({"undo": KIND, "format": FORMAT,
                                                "step": step}) + "\n")


def has_marker(directory: Path) -> bool:
    """Whether `directory` (not a link) carries undo's finished marker."""
    marker = directory / MARKER
    if directory.is_symlink() or not directory.is_dir() or marker.is_symlink():
        return False
    try:
        data = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("undo") == KIND


def is_ours(directory: Path) -> bool:
    """Whether `directory` is a training state undo wrote: it carries undo's marker, or it
    holds nothing but files undo writes into a state (none at all, an unfinished marker, rank
    files, complete.json): a save killed before its marker, or a removal killed after it.
    Only a state with its marker is ever loaded (`has_marker`)."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    if has_marker(directory):
        return True
    return all(p.is_file() and not p.is_symlink()
               and (p.name in (MARKER, COMPLETE) or RANK_FILE.match(p.name))
               for p in directory.iterdir())


def remove_state_dir(directory: Path) -> None:
    """Delete state `directory` (undo's: `is_ours`) so that a kill at any moment leaves one
    that is still undo's and is not resumed: complete.json first, the marker last."""
    entries = sorted(directory.iterdir(), key=lambda p: (p.name != COMPLETE, p.name == MARKER))
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    directory.rmdir()


def file_hashes(directory: Path) -> dict[str, str]:
    """{name: fingerprint} of the rank files in `directory` (recorded in complete.json)."""
    return {p.name: fingerprint_data(p) for p in sorted(directory.iterdir())
            if RANK_FILE.match(p.name)}


# ------------------------------------------------------------------------ encoding


def _encode(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    if isinstance(value, torch.Tensor):
        tag = "__dtensor__" if hasattr(value, "to_local") else "__tensor__"
        local = value.to_local() if tag == "__dtensor__" else value
        tensors[key] = local.detach().to("cpu").contiguous()
        return {tag: key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, f"{key}.k{i}"),
                               _encode(v, tensors, f"{key}.{k if isinstance(k, int) else i}")]
                              for i, (k, v) in enumerate(value.items())]}
    raise TypeError(f"cannot save a {type(value).__name__} in the training state ({key})")


def _decode(value: Any, tensors: dict[str, torch.Tensor], shard=None) -> Any:
    """`shard(key, local)` rebuilds an FSDP shard (None: the local tensor itself)."""
    if isinstance(value, list):
        return [_decode(v, tensors, shard) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value or "__dtensor__" in value:
        key = value.get("__tensor__", value.get("__dtensor__"))
        if key not in tensors:
            raise ValueError(f"tensor {key!r} is missing")
        local = tensors[key]
        return shard(key, local) if "__dtensor__" in value and shard is not None else local
    if "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, shard) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors, shard): _decode(v, tensors, shard)
                for k, v in value["__items__"]}
    return {k: _decode(v, tensors, shard) for k, v in value.items()}


# ------------------------------------------------------------------------ saving


def _model_entries(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state as (tensors stored once, {alias: name} for tied tensors)."""
    seen: dict[tuple, str] = {}
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict().items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        ident = (local.data_ptr(), tuple(local.shape), tuple(local.stride()), local.dtype)
        if local.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        stored[name] = tensor
    return stored, aliases


def random_states() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_rank(directory: Path, rank: int, *, model: torch.nn.Module, optimizer,
              run: dict[str, Any], with_weights: bool) -> None:
    """Write process `rank`'s part of the state: the model and optimizer (`with_weights`),
    the run's state and the random generators."""

    tensors: dict[str, torch.Tensor] = {}
    doc: dict[str, Any] = {"run": _encode(run, tensors, "run"),
                           "rng": _encode(random_states(), tensors, "rng")}
    if with_weights:
        stored, aliases = _model_entries(model)
        doc["model"] = {"tensors": {name: _encode(t, tensors, f"model.{name}")
                                    for name, t in stored.items()}, "aliases": aliases}
        doc["optimizer"] = _encode(optimizer.state_dict(), tensors, "optim")
    json_name, tensor_name = rank_files(rank)
    save_file(tensors, str(directory / tensor_name), metadata={"format": "pt"})
    follow_umask(directory / tensor_name)
    (directory / json_name).write_text(json.dumps(doc) + "\n")


# ------------------------------------------------------------------------ loading


def check_files(directory: Path, world: int) -> None:
    """`UsageError` unless `directory` is undo's and holds only the files undo writes."""
    if not has_marker(directory):
        raise UsageError(f"{directory} is not a training state written by this version of "
                         "undo (it has no undo-state.json); undo does not load it: delete it "
                         "to start afresh")
    allowed = allowed_files(world)
    for entry in sorted(directory.iterdir()):
        if entry.name not in allowed or not entry.is_file() or entry.is_symlink():
            raise UsageError(f"refusing to resume from {directory}: it holds {entry.name}, "
                             "which undo does not write (a training state is safetensors and "
                             "JSON only; a pickle there may be planted). Delete the state "
                             "directory to start afresh")


def _refuse(file: Path, what: str) -> UsageError:
    return UsageError(f"cannot resume from {file}: {what}; delete the state directory "
                      f"{file.parent} to start afresh")


def _json_object(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise _refuse(file, f"not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise _refuse(file, "not a JSON object")
    return data


def saved_step(directory: Path) -> int:
    """The step of state `directory`, which its name, its marker and complete.json must
    agree on (`UsageError` naming the file that disagrees)."""
    step = int(directory.name.rsplit("-", 1)[-1])
    for name in (MARKER, COMPLETE):
        value = _json_object(directory / name).get("step")
        if type(value) is not int or value != step:
            raise _refuse(directory / name, f"it says step {value!r}, the directory is "
                                            f"step {step}")
    return step


def read_rank(directory: Path, rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Process `rank`'s JSON document and tensors, each file checked against the fingerprint
    complete.json records (`UsageError` naming the file if it differs or is unreadable)."""
    recorded = _json_object(directory / COMPLETE).get("files")
    if not isinstance(recorded, dict):
        raise _refuse(directory / COMPLETE, "it records no fingerprints of the rank files "
                                            "(written by an older undo)")
    json_name, tensor_name = rank_files(rank)
    for name in (json_name, tensor_name):
        file = directory / name
        if not file.is_file():
            raise _refuse(file, "the file is missing")
        if recorded.get(name) != fingerprint_data(file):
            raise _refuse(file, "the file changed after it was saved (its fingerprint is not "
                                "the one complete.json records)")
    try:
        doc = json.loads((directory / json_name).read_text())
        tensors = load_file(str(directory / tensor_name), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise UsageError(f"cannot read the training state {directory}: {e}") from e
    if not isinstance(doc, dict):
        raise UsageError(f"{directory / json_name}: not a training state")
    return doc, tensors


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _check_tensor(file: Path, name: str, saved: torch.Tensor, target: torch.Tensor) -> None:
    """`UsageError` unless `saved` has `target`'s shape and dtype (nothing broadcast or cast,
    as model loading refuses)."""
    saved, target = _local(saved), _local(target)
    if tuple(saved.shape) != tuple(target.shape):
        raise _refuse(file, f"tensor {name!r} has shape {list(saved.shape)}, the run needs "
                            f"{list(target.shape)}")
    if saved.dtype != target.dtype:
        raise _refuse(file, f"tensor {name!r} is stored as {str(saved.dtype)[6:]}, the run "
                            f"needs {str(target.dtype)[6:]}")


def _check_optimizer(file: Path, state: Any, params: list[torch.Tensor], step: int) -> None:
    """Every per-parameter tensor of the optimizer's saved state has its parameter's shape and
    dtype; a scalar (Adam's `step`) is a float holding a whole count of at most `step`."""
    per_param = state.get("state") if isinstance(state, dict) else None
    if not isinstance(per_param, dict):
        raise _refuse(file, "the optimizer's state is malformed")
    for index, entries in per_param.items():
        if type(index) is not int or not 0 <= index < len(params) or not isinstance(
                entries, dict):
            raise _refuse(file, f"the optimizer's state names parameter {index!r}, which the "
                                f"run's optimizer does not have ({len(params)} parameters)")
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                continue
            name = f"optim.state.{index}.{key}"
            local = _local(value)
            if local.dim() == 0 and key == "step":
                count = float(local) if local.is_floating_point() else None
                if count is None or not (count == int(count) and 0 <= count <= step):
                    raise _refuse(file, f"tensor {name!r} ({local.dtype}, {local.item()}) is "
                                        f"not a step count of at most the run's step {step}")
                continue
            _check_tensor(file, name, local, params[index])


def _shard_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    if not hasattr(param, "device_mesh"):
        return local.to(param.device)
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local.to(param.to_local().device), param.device_mesh,
                              param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def restore(directory: Path, rank: int, *, model: torch.nn.Module, optimizer,
            sharded: bool) -> dict[str, Any]:
    """Load the state of `directory` into `model`, `optimizer` and the random generators of
    this process; returns the run's state (a dict). Weights and optimizer come from this
    process's files when `sharded`, else from process 0's. Everything is checked before
    anything is loaded (module doc)."""
    step = saved_step(directory)
    own, own_tensors = read_rank(directory, rank)
    source = rank if sharded or rank == 0 else 0
    weights, tensors = (own, own_tensors) if source == rank else read_rank(directory, 0)
    file = directory / rank_files(source)[1]
    try:
        run = _decode(own["run"], own_tensors)
        if not isinstance(run, dict) or type(run.get("step")) is not int or run["step"] != step:
            raise _refuse(directory / rank_files(rank)[0],
                          f"the run's step {run.get('step') if isinstance(run, dict) else None!r}"
                          f" is not the state's step {step}")
        entries = weights["model"]
        current = model.state_dict()
        if set(current) != set(entries["tensors"]) | set(entries["aliases"]):
            raise ValueError("it holds other tensors than the model")
        decoded = {name: _decode(ref, tensors) for name, ref in entries["tensors"].items()}
        for name, saved in decoded.items():
            _check_tensor(file, name, saved, current[name])
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def shard(key: str, local: torch.Tensor) -> torch.Tensor:
            index = int(key.split(".")[2])  # optim.state.<index>.<name>
            return _shard_like(params[index], local)

        optim_state = _decode(weights["optimizer"], tensors, shard)
        _check_optimizer(file, optim_state, params, step)
        with torch.no_grad():
            for name, saved in decoded.items():
                _local(current[name]).copy_(saved)
        optimizer.load_state_dict(optim_state)
        rng = _decode(own["rng"], own_tensors)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return run
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise UsageError(f"cannot resume from {directory}: the state does not match this run "
                         f"({e}); delete it to start afresh") from e
