"""Checking a checkpoint directory before any weights are loaded (JSON and headers only).

`inspect_checkpoint` refuses, with one line naming the file (exit 2), everything that can be
seen without loading: a config, index or adapter config that is not a JSON object, an index
naming files outside the directory or missing, a truncated or corrupt safetensors header,
pickled weights or adapters without `allow_pickle`, an adapter whose base is itself an
adapter (or itself), a config whose sizes are not counts or that declares more layers than
the weight files hold. `check_fits_memory` refuses a model whose size, estimated from its
config, cannot fit in the memory available. What loading itself reports is checked by
`undo_cli.checkpoint.load`.
"""

from __future__ import annotations

import json
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from undo_cli.checkpoint.plan import count_parameters, weight_bytes
from undo_cli.checkpoint.safetensors_io import (
    DTYPES,
    CheckpointReader,
    TensorEntry,
    index_weight_file,
    read_index,
)
from undo_cli.errors import DataError, UsageError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
SAVED_FLOATS = ("F16", "BF16", "F32", "F64")  # dtypes a model is saved in (`stored_dtype`)
MAX_JSON_BYTES = 64 << 20  # a config or index larger than this is not a config or an index

# Sizes a config gives as counts; anything else there is refused before transformers sees it.
SIZE_KEYS = ("vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
             "num_layers", "intermediate_size", "n_inner", "num_attention_heads", "n_head",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "n_positions")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# `model.layers.3.mlp...`, `transformer.h.3.attn...`: the layer index of a tensor name.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, found without loading any weights."""

    path: Path
    kind: str  # "model" or "adapter"
    weight_files: list[Path] = field(default_factory=list)
    pickled: bool = False  # weights are pickled .bin files
    base: CheckpointInfo | None = None  # the base model of an adapter
    config_data: dict[str, Any] = field(default_factory=dict)  # config.json (adapter_config)
    # Stored tensors (safetensors only): name -> entry (dtype, shape, file).
    tensors: dict[str, TensorEntry] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        """The checkpoint's config.json (the base model's for an adapter)."""
        if self.kind == "adapter":
            assert self.base is not None
            return self.base.config
        return self.config_data

    @property
    def model_info(self) -> CheckpointInfo:
        """The full model whose weights are read: this checkpoint, or an adapter's base."""
        if self.kind == "adapter":
            assert self.base is not None
            return self.base
        return self

    def stored_dtype(self) -> str | None:
        """torch's name of the dtype ("bfloat16", ...) that holds most of the model's
        floating-point weights (an adapter's: its base's), from the safetensors headers or
        else config.json; None if neither says."""
        info = self.model_info
        sizes: dict[str, int] = {}
        for entry in info.tensors.values():
            if entry.dtype in SAVED_FLOATS:
                sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.nbytes
        if sizes:
            return DTYPES[max(sorted(sizes), key=sizes.__getitem__)][1]
        named = info.config_data.get("dtype", info.config_data.get("torch_dtype"))
        return named if named in {DTYPES[d][1] for d in SAVED_FLOATS} else None

    def largest_shard_bytes(self) -> int | None:
        """Bytes of the largest weight file of a model sharded over several files (an
        adapter's: its base's); None for a model in one file."""
        info = self.model_info
        if len(info.weight_files) < 2:
            return None
        if info.tensors:
            per_file: dict[Path, int] = {}
            for entry in info.tensors.values():
                per_file[entry.path] = per_file.get(entry.path, 0) + entry.nbytes
            return max(per_file.values())
        return max(f.stat().st_size for f in info.weight_files)

    def weights_name(self) -> str:
        """The weight file (or index) a missing tensor is missing from, for messages."""
        for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
            if (self.path / index).is_file():
                return index
        if len(self.weight_files) == 1:
            return self.weight_files[0].relative_to(self.path).as_posix()
        return "the weight files"

    def file_of(self, tensor: str) -> str:
        """The file holding stored tensor `tensor` (relative), else `weights_name()`."""
        entry = self.tensors.get(tensor)
        if entry is None:
            return self.weights_name()
        return entry.path.relative_to(self.path).as_posix()


def read_json_object(file: Path) -> dict[str, Any]:
    """A small JSON file holding an object; `DataError` naming the file otherwise."""
    try:
        mode = file.stat().st_mode
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file) from e
    if not stat.S_ISREG(mode):
        raise DataError("not a regular file", file)
    if file.stat().st_size > MAX_JSON_BYTES:
        raise DataError(f"larger than {MAX_JSON_BYTES >> 20} MB: not a config file", file)
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not valid JSON ({e})", file) from e
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", file) from e
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, found a JSON {type(value).__name__}", file)
    return value


def _weight_files(path: Path) -> tuple[list[Path], bool]:
    """The weight files of a model directory and whether they are pickles."""
    for name, pickled in ((SAFETENSORS_INDEX, False), (PICKLE_INDEX, True)):
        index_file = path / name
        if index_file.is_file():
            index = read_index(index_file)
            files = sorted({index_weight_file(path, f, index_file)
                            for f in index["weight_map"].values()})
            return files, pickled
        if name == SAFETENSORS_INDEX:
            single = sorted(path.glob("*.safetensors"))
            if single:
                return single, False
    return sorted(path.glob("*.bin")), True


def _resolve_base(adapter_dir: Path, name: Any, config_file: Path,
                  base_model: str | Path | None = None) -> Path:
    """The base model's directory: `base_model` (--base-model) if given, else
    base_model_name_or_path as a path (as given, or beside the adapter)."""
    if base_model is not None:
        base = Path(base_model)
        if not base.is_dir():
            raise UsageError(f"--base-model {base}: not a directory (give the local checkpoint "
                             "directory of the adapter's base model)")
        return base
    if not isinstance(name, str) or not name.strip():
        raise DataError("names no base_model_name_or_path (the adapter's base model); give "
                        "--base-model DIR", config_file)
    for candidate in (Path(name), adapter_dir / name, adapter_dir.parent / name):
        if candidate.is_dir():
            return candidate
    raise UsageError(
        f"{adapter_dir}: the adapter's base model '{name}' is not a local directory (undo "
        "never downloads): give its local copy with --base-model DIR"
    )


def _same_directory(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def _inspect_adapter(path: Path, allow_pickle: bool,
                     base_model: str | Path | None = None) -> CheckpointInfo:
    config_file = path / ADAPTER_CONFIG
    config = read_json_object(config_file)
    base_path = _resolve_base(path, config.get("base_model_name_or_path"), config_file,
                              base_model)
    if _same_directory(base_path, path) or (base_path / ADAPTER_CONFIG).is_file():
        raise DataError(f"the adapter's base model {base_path} is itself an adapter (or this "
                        "directory); undo loads one adapter on a full model", config_file)
    if (path / ADAPTER_WEIGHTS).is_file():
        files, pickled = [path / ADAPTER_WEIGHTS], False
    elif (path / ADAPTER_PICKLE).is_file():
        files, pickled = [path / ADAPTER_PICKLE], True
        if not allow_pickle:
            raise UsageError(
                f"{path} holds a pickled adapter ({ADAPTER_PICKLE}); pickles can run code when "
                "loaded. Convert it to safetensors, or pass --allow-pickle to load it with "
                "torch.load(weights_only=True)")
    else:
        raise UsageError(f"{path} holds no adapter weights ({ADAPTER_WEIGHTS})")
    base = inspect_checkpoint(base_path, allow_pickle=allow_pickle)
    info = CheckpointInfo(path=path, kind="adapter", weight_files=files, pickled=pickled,
                          base=base, config_data=config)
    if not pickled:
        with CheckpointReader(files[0]) as reader:
            info.tensors = dict(reader.entries)
    return info


def inspect_checkpoint(path: str | Path, *, allow_pickle: bool = False,
                       base_model: str | Path | None = None) -> CheckpointInfo:
    """Check that `path` is a loadable checkpoint directory; raise `UsageError` (or
    `DataError`, naming the file) saying why not. Reads JSON and safetensors headers only.

    `base_model` (--base-model) is the base of an adapter, in place of the one its
    adapter_config.json names; it is ignored for a full checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory (a checkpoint is a directory with "
                         "config.json and model weights)")
    if (path / ADAPTER_CONFIG).exists():
        return _inspect_adapter(path, allow_pickle, base_model)
    if not (path / "config.json").exists():
        raise UsageError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    config = read_json_object(path / "config.json")
    check_config_sizes(config, path / "config.json")
    files, pickled = _weight_files(path)
    if not files:
        raise UsageError(f"{path} holds no model weights (*.safetensors)")
    missing = [f.relative_to(path).as_posix() for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"{path}: weight files named in the index are missing: {missing}")
    if pickled and not allow_pickle:
        raise UsageError(
            f"{path} holds only pickled weights ({files[0].name}); pickles can run code when "
            "loaded. Convert them to safetensors, or pass --allow-pickle to load them with "
            "torch.load(weights_only=True)"
        )
    info = CheckpointInfo(path=path, kind="model", weight_files=files, pickled=pickled,
                          config_data=config)
    if not pickled:
        with CheckpointReader(path) as reader:  # headers: corrupt or truncated files fail here
            info.tensors = dict(reader.entries)
        check_layers(info)
    return info


def check_config_sizes(config: dict[str, Any], file: Path) -> None:
    """`DataError` for a size in config.json that is not a count (a non-negative integer; a
    float with an integral value, as some exporters write, passes)."""
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is None or (isinstance(value, float) and value.is_integer() and value >= 0):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"'{key}' must be a non-negative integer (got {value!r})", file)


def declared_layers(config: dict[str, Any]) -> int | None:
    """The number of layers config.json declares, if it says."""
    return next((config[k] for k in LAYER_KEYS if isinstance(config.get(k), int)), None)


def check_layers(info: CheckpointInfo) -> None:
    """`DataError` if config.json declares more layers than the weight files hold (checked
    before a model of that size is built)."""
    declared = declared_layers(info.config_data)
    found = {int(m.group(1)) for name in info.tensors
             if (m := _LAYER_INDEX.search(name)) is not None}
    if declared is None or not found or declared <= max(found) + 1:
        return
    held = max(found) + 1
    raise DataError(f"declares {declared} layers but {info.weights_name()} holds tensors of "
                    f"{held}: the weights of layers {held}..{declared - 1} are missing",
                    info.path / "config.json")


# ------------------------------------------------------------------------------ memory


def estimate_parameters(config: dict[str, Any]) -> int | None:
    """The parameters of the model of `config` (`plan.count_parameters`: exact for the
    architectures `undo init` offers, a lower bound for others); None without the sizes."""
    return count_parameters(config)


def check_fits_memory(config: dict[str, Any], bytes_per_parameter: int, what: str) -> None:
    """`UsageError` (with the estimate) if the model of `config` cannot fit in the memory
    available to this process: checked before it is built, so that a config claiming
    200,000 layers fails in a moment instead of allocating until killed."""
    from undo_cli.runtime import available_memory

    weights = weight_bytes(config, bytes_per_parameter)  # the memory plan's weight bytes
    free = available_memory()
    if weights is None or free is None:
        return
    params, need = weights
    if need > free:
        raise UsageError(f"{what} needs at least {need / 1e9:,.1f} GB ({params:,} parameters "
                         f"estimated from its config, {bytes_per_parameter} bytes each) but "
                         f"only {free / 1e9:,.1f} GB of memory is available")
