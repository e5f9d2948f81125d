"""The noise step on tensors already in memory (torch): the same values as `undo perturb` on
the saved checkpoint, used by `undo distill --student teacher --alpha A --beta B`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from undo_cli.checkpoint.safetensors_io import dtype_name
from undo_cli.errors import UsageError
from undo_cli.options import NoiseOptions
from undo_cli.perturb import noise
from undo_cli.perturb.noise import (
    PerturbOptions,
    noise_scale,
    perturb_chunk,
    resolve_noise,
    tensor_action,
    thread_count,
    tied_embeddings,
)

if TYPE_CHECKING:
    import torch


def perturb_tensor(name: str, tensor: torch.Tensor, settings: NoiseOptions, seed: int = 0, *,
                   key: str | None = None, threads: int | None = None) -> torch.Tensor:
    """The noise step of `settings` applied to one in-memory tensor; returns a new tensor
    (same dtype, shape and device). Identical to what `perturb_checkpoint` writes for a
    tensor of that name.

    `key` names the noise (default `name`; tied weights use the input embedding's name).
    The tensor selection (layers, include/exclude) is not applied here (see
    `perturb_state_dict`).
    """
    options, _ = resolve_noise(replace(settings, include=[], exclude=[], layers=None), seed)
    return _perturb_in_memory(name if key is None else key, tensor, options, threads)


def _perturb_in_memory(key: str, tensor: torch.Tensor, options: PerturbOptions,
                       threads: int | None = None) -> torch.Tensor:
    import torch

    src = tensor.detach()
    dtype = dtype_name(src.dtype) if src.is_floating_point() else None
    action = tensor_action(key, tuple(src.shape), dtype is not None, options)
    if action == "copy" or src.numel() == 0:
        return src.clone()
    raw = src.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    n, size = src.numel(), src.element_size()
    scale = noise_scale(tuple(src.shape), options.noise) if action == "noise" else 0.0
    out = np.empty(n * size, dtype=np.uint8)

    def run(chunk: int) -> None:
        start = chunk * noise.CHUNK_ELEMENTS
        count = min(noise.CHUNK_ELEMENTS, n - start)
        out[start * size:(start + count) * size] = perturb_chunk(
            raw[start * size:(start + count) * size], action=action, key=key, chunk=chunk,
            count=count, scale=scale, dtype=dtype, options=options)

    chunks = range(math.ceil(n / noise.CHUNK_ELEMENTS))
    workers = thread_count(threads)
    if workers > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, chunks))
    else:
        for chunk in chunks:
            run(chunk)
    return torch.from_numpy(out).view(src.dtype).reshape(src.shape).to(tensor.device)


def perturb_state_dict(state_dict: dict[str, torch.Tensor], settings: NoiseOptions,
                       seed: int = 0, *, tie_word_embeddings: bool = False,
                       model_type: str | None = None,
                       threads: int | None = None) -> dict[str, torch.Tensor]:
    """The noise step of `settings` on a state dict; returns new tensors (the input is not
    modified).

    Gives the same values as `perturb_checkpoint` on a checkpoint of this state dict. Names
    sharing one tensor (tied weights) get one perturbed tensor, keyed by the input
    embedding's name when `tie_word_embeddings` (else by the first name).
    """
    options, _ = resolve_noise(settings, seed, names=state_dict, model_type=model_type)
    new = _perturb_state(state_dict, options, tie_word_embeddings, threads)
    return {name: state_dict[name].detach().clone() if value is None else value
            for name, value in new.items()}


def _perturb_state(state_dict: dict[str, torch.Tensor], options: PerturbOptions,
                   tie_word_embeddings: bool, threads: int | None
                   ) -> dict[str, torch.Tensor | None]:
    """Perturbed tensors of `state_dict` by name; None for a tensor the options leave
    unchanged (so that the in-place path never writes it)."""
    ties = tied_embeddings(state_dict, tie_word_embeddings)
    groups: dict[tuple, list[str]] = {}
    for name, t in state_dict.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype, t.device) if t.numel() else ("empty", name)
        groups.setdefault(ident, []).append(name)
    for alias, canonical in ties.items():  # tied by config even if stored as two tensors
        a = next(k for k, v in groups.items() if alias in v)
        c = next(k for k, v in groups.items() if canonical in v)
        if a != c and _same_layout(state_dict[alias], state_dict[canonical]):
            groups[c] += groups.pop(a)
    out: dict[str, torch.Tensor | None] = {}
    for members in groups.values():
        key = next((ties[m] for m in members if m in ties), members[0])
        if key not in members:
            key = members[0]
        src = state_dict[key]
        action = tensor_action(key, tuple(src.shape), src.is_floating_point(), options)
        value = None if action == "copy" else _perturb_in_memory(key, src, options, threads)
        for m in members:
            out[m] = value
    return {name: out[name] for name in state_dict}


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


def _model_options(model, settings: NoiseOptions, seed: int = 0, *,
                   only: Iterable[str] | None = None
                   ) -> tuple[PerturbOptions, tuple[tuple[int, ...], str] | None]:
    """`resolve_noise` for a loaded (or meta) model: against its tensor names and type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return resolve_noise(settings, seed, names=model.state_dict(), model_type=model_type,
                         only=only)


def noise_selection(model, settings: NoiseOptions, *,
                    only: Iterable[str] | None = None) -> dict:
    """What `perturb_model_` with `settings` does to `model`, for manifests: the layers
    and their pattern, the names of the tensors noised and shrunk, and how many stay
    unchanged. `UsageError` if the selection names no tensor at all."""
    options, selection = _model_options(model, settings, only=only)
    noised, shrunk, unchanged = [], [], 0
    state = model.state_dict()
    ties = tied_embeddings(state, _ties(model))  # a tied head follows its input embedding
    for name, t in state.items():
        action = tensor_action(ties.get(name, name), tuple(t.shape), t.is_floating_point(),
                               options)
        if action == "noise":
            noised.append(name)
        elif action == "shrink":
            shrunk.append(name)
        else:
            unchanged += 1
    if not (noised or shrunk) and options.alpha > 0:
        raise UsageError("the noise selection (--layers / --include / --exclude) matches no "
                         "tensor of the model")
    return {"layers": list(selection[0]) if selection else None,
            "layer_pattern": selection[1] if selection else None,
            "include": [p.pattern for p in options.include],
            "exclude": [p.pattern for p in options.exclude],
            "only_trained": options.only is not None,
            "noised": noised, "shrunk": shrunk, "unchanged": unchanged}


def _ties(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def perturb_model_(model, settings: NoiseOptions, seed: int = 0, *,
                   only: Iterable[str] | None = None, threads: int | None = None):
    """Apply the noise step of `settings` to a loaded model in place (same values as
    `undo perturb` on its saved checkpoint with the same selection); returns the model.
    `settings.layers` ("10-15") limits it to those decoder layers, `only` to exactly those
    tensor names; tensors outside the selection are not touched."""
    options, _ = _model_options(model, settings, seed, only=only)
    return _apply(model, options, threads)


def _apply(model, options: PerturbOptions, threads: int | None = None):
    """The noise step of resolved `options` on `model`, in place."""
    import torch

    state = model.state_dict()
    new = _perturb_state(state, options, _ties(model), threads)
    done: set[int] = set()
    with torch.no_grad():
        for name, tensor in state.items():
            value = new[name]
            if value is None or id(value) in done:  # unchanged, or a tied alias written
                continue
            done.add(id(value))
            tensor.copy_(value)
    return model


def perturb_adapter(info, dst, settings: NoiseOptions, seed: int, *,
                    shard_bytes: int | None, overwrite: bool, threads: int | None,
                    allow_nonfinite: bool, arguments: dict, progress=None) -> dict:
    """`undo perturb` of a PEFT adapter (`info`, its `CheckpointInfo`): the adapter merged into
    its base in memory, cast to the base's dtype, noised as `perturb_checkpoint` would noise
    that merged checkpoint (the selection resolved against the merged model's names), and
    written in the base's dtype and sharding (or `shard_bytes`). Returns the counts of the
    summary."""
    import torch

    from undo_cli.checkpoint import (
        Layout,
        atomic_output,
        build_manifest,
        load_model,
        load_tokenizer,
        save_layout,
        save_model,
        write_manifest,
    )

    base = info.base.path
    layout = save_layout(source=info)
    if shard_bytes is not None:
        layout = Layout(layout.dtype, shard_bytes)
    model = load_model(info.path, base_model=base)  # merged in fp32, then rounded once
    model.to(getattr(torch, layout.dtype))
    tokenizer = load_tokenizer(info.path, base_model=base)
    options, _ = _model_options(model, settings, seed)
    state = model.state_dict()
    counts = {"noised": 0, "shrunk": 0, "copied": 0, "tied_copies": 0,
              "parameters_noised": 0, "parameters_shrunk": 0}
    seen: set[tuple] = set()
    for name, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            counts["tied_copies"] += 1
            continue
        seen.add(ident)
        action = tensor_action(name, tuple(t.shape), t.is_floating_point(), options)
        key = {"noise": "noised", "shrink": "shrunk"}.get(action, "copied")
        counts[key] += 1
        if action != "copy":
            counts[f"parameters_{key}"] += t.numel()
    _apply(model, options, threads)
    if not allow_nonfinite:
        for name, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise UsageError(f"{info.path}: tensor {name!r} of the merged model would be "
                                 "written with NaN or infinite values: lower --beta, or pass "
                                 "--allow-nonfinite to write them anyway")
    total = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_output(dst, inputs=[info.path, base], overwrite=overwrite) as tmp:
        save_model(model, tokenizer, tmp, source=info.path, layout=layout)
        write_manifest(tmp, build_manifest(
            "perturb", arguments=arguments, parents={"input": info.path, "input_base": base},
            seed=seed, extra={"perturb": counts,
                                      "merged_adapter": {"adapter": str(info.path),
                                                         "base": str(base)}}))
        if progress is not None:
            progress(total)
    return {**counts, "bytes_written": total}
