"""Reading Hugging Face checkpoint directories (never from a hub: local directories only).

`inspect_checkpoint` (`undo_cli.checkpoint.inspection`) only reads JSON and headers; torch and
transformers are imported by the functions that load weights, so that commands that never load
a model do not pay for them. Every load checks transformers' loading report
(`check_loading_report`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from undo_cli.checkpoint.inspection import (
    CheckpointInfo,
    check_fits_memory,
    inspect_checkpoint,
    read_json_object,
)
from undo_cli.checkpoint.safetensors_io import FLOAT_DTYPES
from undo_cli.errors import UndoError, UsageError

if TYPE_CHECKING:
    import torch

# Tensors a model legitimately recomputes instead of reading them from its files, so that a
# loading report may list them as missing (or, from files of older versions, unexpected)
# without the checkpoint being broken. Everything else missing, unexpected or mismatched is
# an error: transformers would otherwise fill the gap with random weights and only warn.
RECOMPUTED = (
    re.compile(r"(?:^|\.)rotary_emb\.inv_freq$"),  # rotary position tables (buffers)
    re.compile(r"(?:^|\.)attn\.(?:masked_)?bias$"),  # GPT-2's causal-mask buffers, old files
    re.compile(r"(?:^|\.)position_ids$"),  # position index buffers
)
# Output embeddings recomputed from the input embedding when config.json ties them.
TIED_OUTPUTS = ("lm_head.weight", "embed_out.weight", "output.weight")


def recomputed(name: str, tied: bool) -> bool:
    """Whether tensor `name` is one the architecture recomputes (see `RECOMPUTED`)."""
    if tied and name.endswith(TIED_OUTPUTS):
        return True
    return any(p.search(name) for p in RECOMPUTED)


# Small JSON files transformers reads with the tokenizer (each must hold an object).
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json",
                     "generation_config.json")


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's text (libraries write whole reports)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def check_loading_report(info: CheckpointInfo, model, report: dict) -> None:
    """`DataError`-like `UsageError` (exit 2) naming the tensor and the file for a tensor
    missing from the files, a stored tensor the model has no place for, or one whose shape
    or dtype (an integer dtype where the model holds floats) does not match; tensors the
    architecture recomputes (`RECOMPUTED`, tied output embeddings) excepted."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    problems: list[str] = []
    for name in sorted(report.get("missing_keys") or ()):
        if not recomputed(name, tied):
            problems.append(f"tensor {name!r} is missing from {info.weights_name()}")
    for name in sorted(report.get("unexpected_keys") or ()):
        if not recomputed(name, tied):
            problems.append(f"tensor {name!r} in {info.file_of(name)} has no place in the "
                            f"{type(model).__name__} that config.json describes")
    for name, stored, wanted in sorted(report.get("mismatched_keys") or (), key=str):
        problems.append(f"tensor {name!r} in {info.file_of(name)} has shape {list(stored)}, "
                        f"the model needs {list(wanted)}")
    if info.tensors:
        for name, tensor in model.state_dict().items():
            entry = info.tensors.get(name)
            if (entry is not None and tensor.is_floating_point()
                    and entry.dtype not in FLOAT_DTYPES):
                problems.append(f"tensor {name!r} in {info.file_of(name)} is stored as "
                                f"{entry.dtype}, the model needs floating-point weights")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(f"{info.path}: {problems[0]}{more}; the checkpoint is incomplete or "
                         "does not match its config.json (undo never fills in random weights)")


def _from_pretrained(info: CheckpointInfo, dtype: torch.dtype, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    check_fits_memory(info.config, torch.empty((), dtype=dtype).element_size(),
                      f"the model in {info.path}")
    try:
        model, report = AutoModelForCausalLM.from_pretrained(
            info.path,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=not info.pickled,
            weights_only=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported, then refused by check_loading_report
        )
    except Exception as e:  # noqa: BLE001 - transformers/safetensors/pickle raise many types
        message = first_line(e)
        if "Weights only load failed" in str(e):
            message = ("the pickle holds objects other than tensors (refused by "
                       "torch.load(weights_only=True)); it may be malicious")
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise UsageError(f"cannot load model from {info.path}: it needs custom code; pass "
                             "--trust-remote-code if you trust its source") from e
        raise UndoError(f"cannot load model from {info.path}: {message}") from e
    check_loading_report(info, model, report)
    return model


def _adapter_config(info: CheckpointInfo):
    """The adapter's `PeftConfig`, checked before its base is loaded: a `peft_type` peft
    knows and a positive rank (`UsageError` naming adapter_config.json)."""
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    file = info.path / "adapter_config.json"
    peft_type = info.config_data.get("peft_type")
    known = sorted(str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING)
    if peft_type not in known:
        raise UsageError(f"{file}: unknown peft_type {peft_type!r} (peft {_peft_version()} "
                         "does not know it; a LoRA adapter says \"LORA\")")
    try:
        config = PeftConfig.from_pretrained(str(info.path))
    except Exception as e:  # noqa: BLE001 - peft raises many types
        raise UsageError(f"{file}: not a valid {peft_type} adapter config ({first_line(e)})"
                         ) from e
    rank = getattr(config, "r", None)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"{file}: the rank r must be a positive whole number (got {rank!r})")
    # The base is the local directory found (or --base-model), never a hub name.
    config.base_model_name_or_path = str(info.base.path)
    config.inference_mode = True
    return config


def _peft_version() -> str:
    import peft

    return peft.__version__


def _load_adapter(base, info: CheckpointInfo, config):
    """`base` with the adapter of `info` merged in, after checking that the adapter fits the
    base and that its file holds exactly the adapter weights the model expects, each of the
    shape and dtype the base needs (`UsageError` naming the tensor, before any is read)."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    try:
        model = get_peft_model(base, config)
    except Exception as e:  # noqa: BLE001 - e.g. target modules the base does not have
        raise UsageError(f"{info.path}: the adapter does not fit its base {info.base.path}: "
                         f"{first_line(e)}") from e
    if info.tensors:
        _check_adapter_tensors(info, get_peft_model_state_dict(model))
    try:
        model.load_adapter(str(info.path), adapter_name="default", is_trainable=False,
                           key_mapping=getattr(base, "_checkpoint_conversion_mapping", None))
    except Exception as e:  # noqa: BLE001
        raise UndoError(f"cannot load adapter {info.path}: {_load_error(e)}") from e
    merged = model.merge_and_unload()
    # PEFT froze the base weights to train the adapter; the merged model is a plain model
    # again, every weight trainable, as `from_pretrained` gives it.
    merged.requires_grad_(True)
    return merged


def _check_adapter_tensors(info: CheckpointInfo, expected: dict) -> None:
    """The adapter file's tensors (from its header) against those the model expects."""
    file = info.weight_files[0].name
    missing = sorted(set(expected) - set(info.tensors))
    unexpected = sorted(set(info.tensors) - set(expected))
    if missing or unexpected:
        what = (f"tensor {missing[0]!r} is missing from {file}" if missing else
                f"tensor {unexpected[0]!r} in {file} has no place in the adapter")
        count = len(missing) + len(unexpected)
        more = f" (and {count - 1} more)" if count > 1 else ""
        raise UsageError(f"{info.path}: {what}{more}; the adapter does not match its "
                         "adapter_config.json and base model")
    for name, entry in sorted(info.tensors.items()):
        if entry.dtype not in FLOAT_DTYPES:
            raise UsageError(f"{info.path}: tensor {name!r} in {file} is stored as "
                             f"{entry.dtype}, an adapter holds floating-point weights")
        wanted = list(expected[name].shape)
        if list(entry.shape) != wanted:
            raise UsageError(f"{info.path}: tensor {name!r} in {file} has shape "
                             f"{list(entry.shape)}, the base {info.base.path} needs {wanted} "
                             "(an adapter of another rank or for a model of another size)")


def _load_error(error: BaseException) -> str:
    """A one-line account of a failed load: torch's "Error(s) in loading state_dict" report
    is cut to its first problem (the tensor and both shapes)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1]
    return first_line(error)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    base_model: str | Path | None = None,
):
    """Load a causal LM from a checkpoint directory (an adapter is merged into its base:
    `base_model` if given, else the directory its adapter_config.json names).

    Weights are loaded in `dtype` (None: fp32, as bf16 is very slow on CPUs) and moved to
    `device` when given; every parameter requires grad. Pickled weights need `allow_pickle`;
    custom code needs `trust_remote_code`. The loading report is checked
    (`check_loading_report`): a model with a missing, unexpected or mismatched tensor is
    refused, never completed at random; a model that cannot fit in the memory available is
    refused before it is built.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    info = inspect_checkpoint(path, allow_pickle=allow_pickle, base_model=base_model)
    if info.kind == "adapter":
        config = _adapter_config(info)  # checked before the base is loaded
        model = _load_adapter(_from_pretrained(info.base, dtype, trust_remote_code), info,
                              config)
    else:
        model = _from_pretrained(info, dtype, trust_remote_code)
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False,
                   base_model: str | Path | None = None):
    """Load the tokenizer of a checkpoint (an adapter without one uses its base's:
    `base_model` if given)."""
    from transformers import AutoTokenizer

    info = inspect_checkpoint(path, allow_pickle=True, base_model=base_model)
    source = info.path
    has_tokenizer = any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if info.kind == "adapter" and not has_tokenizer:
        source = info.base.path
    for name in TOKENIZER_CONFIGS:  # malformed: refused naming the file, before transformers
        if (source / name).exists():
            read_json_object(source / name)
    try:
        return AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - tokenizers raise many types, with long reports
        raise UndoError(f"cannot load tokenizer from {source}: {first_line(e)}") from e


def load_model_and_tokenizer(path: str | Path, **kwargs):
    """`(load_model(path, **kwargs), load_tokenizer(path))`."""
    model = load_model(path, **kwargs)
    tokenizer = load_tokenizer(path, trust_remote_code=kwargs.get("trust_remote_code", False),
                               base_model=kwargs.get("base_model"))
    return model, tokenizer
