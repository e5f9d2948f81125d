"""Reading Hugging Face checkpoint directories (never from a hub: local directories only).

`inspect_checkpoint` only reads JSON and file names; torch and transformers are imported by
the functions that load weights, so that commands that never load a model do not pay for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from undo_cli.errors import UndoError, UsageError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"

if TYPE_CHECKING:
    import torch


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, found without loading any weights."""

    path: Path
    kind: str  # "model" or "adapter"
    weight_files: list[Path] = field(default_factory=list)
    pickled: bool = False  # weights are pickled .bin files
    base: CheckpointInfo | None = None  # the base model of an adapter

    @property
    def config(self) -> dict:
        """The checkpoint's config.json (the base model's for an adapter)."""
        if self.kind == "adapter":
            assert self.base is not None
            return self.base.config
        return json.loads((self.path / "config.json").read_text())


def _weight_files(path: Path) -> tuple[list[Path], bool]:
    """The weight files of a model directory and whether they are pickles."""
    if (path / SAFETENSORS_INDEX).is_file():
        index = json.loads((path / SAFETENSORS_INDEX).read_text())
        return sorted({path / f for f in index["weight_map"].values()}), False
    single = sorted(path.glob("*.safetensors"))
    if single:
        return single, False
    if (path / PICKLE_INDEX).is_file():
        index = json.loads((path / PICKLE_INDEX).read_text())
        return sorted({path / f for f in index["weight_map"].values()}), True
    return sorted(path.glob("*.bin")), True


def _resolve_base(adapter_dir: Path, name: str | None) -> Path:
    if not name:
        raise UsageError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path")
    for candidate in (Path(name), adapter_dir / name, adapter_dir.parent / name):
        if candidate.is_dir():
            return candidate
    raise UsageError(
        f"{adapter_dir}: the adapter's base model '{name}' is not a local directory "
        "(undo never downloads; point base_model_name_or_path at a checkpoint directory)"
    )


def inspect_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> CheckpointInfo:
    """Check that `path` is a loadable checkpoint directory; raise `UsageError` saying why not."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory (a checkpoint is a directory with "
                         "config.json and model weights)")
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file():
        try:
            base_name = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        except json.JSONDecodeError as e:
            raise UsageError(f"{adapter_cfg}: not valid JSON ({e})") from e
        base = inspect_checkpoint(_resolve_base(path, base_name), allow_pickle=allow_pickle)
        return CheckpointInfo(path=path, kind="adapter", base=base)
    if not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path / 'config.json'}: not valid JSON ({e})") from e
    files, pickled = _weight_files(path)
    if not files:
        raise UsageError(f"{path} holds no model weights (*.safetensors)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"{path}: weight files named in the index are missing: {missing}")
    if pickled and not allow_pickle:
        raise UsageError(
            f"{path} holds only pickled weights ({files[0].name}); pickles can run code when "
            "loaded. Convert them to safetensors, or pass --allow-pickle to load them with "
            "torch.load(weights_only=True)"
        )
    return CheckpointInfo(path=path, kind="model", weight_files=files, pickled=pickled)


def _from_pretrained(info: CheckpointInfo, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            info.path,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=not info.pickled,
            weights_only=True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:  # noqa: BLE001 - transformers/safetensors/pickle raise many types
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e):
            message = ("the pickle holds objects other than tensors (refused by "
                       "torch.load(weights_only=True)); it may be malicious")
        if "trust_remote_code" in str(e) and not trust_remote_code:
            message = "it needs custom code; pass --trust-remote-code if you trust its source"
        raise UndoError(f"cannot load model from {info.path}: {message}") from e


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """Load a causal LM from a checkpoint directory (an adapter is merged into its base).

    Weights are loaded in `dtype` (None: fp32, as bf16 is very slow on CPUs) and moved to
    `device` when given. Pickled weights need `allow_pickle`; custom code needs
    `trust_remote_code`.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    info = inspect_checkpoint(path, allow_pickle=allow_pickle)
    if info.kind == "adapter":
        from peft import PeftModel

        base = _from_pretrained(info.base, dtype, trust_remote_code)
        try:
            model = PeftModel.from_pretrained(base, str(info.path)).merge_and_unload()
        except Exception as e:  # noqa: BLE001
            raise UndoError(f"cannot load adapter {info.path}: {e}") from e
    else:
        model = _from_pretrained(info, dtype, trust_remote_code)
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """Load the tokenizer of a checkpoint (an adapter without one uses its base's)."""
    from transformers import AutoTokenizer

    info = inspect_checkpoint(path, allow_pickle=True)
    source = info.path
    has_tokenizer = any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if info.kind == "adapter" and not has_tokenizer:
        source = info.base.path
    try:
        return AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UndoError(f"cannot load tokenizer from {source}: {e}") from e


def load_model_and_tokenizer(path: str | Path, **kwargs):
    """`(load_model(path, **kwargs), load_tokenizer(path))`."""
    model = load_model(path, **kwargs)
    tokenizer = load_tokenizer(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    return model, tokenizer
