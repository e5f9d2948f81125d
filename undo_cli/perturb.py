"""The Noise step of UNDO: shrink every weight and add Xavier noise, streamed tensor by tensor.

For every floating-point tensor with two or more dimensions (embeddings included)::

    out = (1 - alpha) * w + alpha * beta * N

where N is Xavier noise for the tensor's fan-in and fan-out (as
`torch.nn.init._calculate_fan_in_and_fan_out`): uniform on [-b, b] with
b = sqrt(6 / (fan_in + fan_out)) (`xavier-uniform`, the paper's choice) or normal with
std = sqrt(2 / (fan_in + fan_out)) (`xavier-normal`). One-dimensional tensors (norm weights,
biases) are only shrunk, `out = (1 - alpha) * w`, as in the reference implementation. Tensors
that are not floating point, and tensors left out by `include` / `exclude`, are copied
unchanged. alpha = 0 leaves every weight as it is; alpha = beta = 1 is a fresh Xavier
initialisation of the weight matrices (and zeroes the 1-D tensors).

Noise is computed in fp32 (fp64 for fp64 tensors) and converted to the tensor's dtype at the
end, rounding to nearest-even once. It is drawn in fixed chunks of `CHUNK_ELEMENTS` elements
of the flattened tensor; chunk k of the tensor named `name` uses numpy's SFC64 generator
seeded from a hash of (seed, name, k) (see `draw_noise` for how its bits become noise). So a
tensor's noise depends only on (seed, name): not on the sharding, the order tensors are
processed in, or the number of threads. Uniform noise depends only on SFC64's bit stream,
which numpy keeps stable across versions; normal noise uses numpy's ziggurat sampler.

The arithmetic runs on numpy arrays over the raw bytes (bf16 is widened and rounded with
integer operations; float8 goes through torch), so the streaming command never imports torch
and starts in a fraction of a second.

`perturb_tensor` / `perturb_state_dict` / `perturb_model_` apply exactly the same noise to
tensors already in memory (used by `undo distill --alpha --beta`).

Tied weights (e.g. GPT-2's `lm_head.weight` and `transformer.wte.weight`) are noised once,
keyed by the input embedding's name; a checkpoint that stores both gets identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from undo_cli.checkpoint.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointReader,
    SafetensorsWriter,
    TensorSpec,
    dtype_name,
    file_order,
    natural_key,
    parse_size,
    pread_exact,
    shard_file_names,
    split_shards,
    torch_dtype,
    write_index,
)
from undo_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

NOISES = ("xavier-uniform", "xavier-normal")
RECOMMENDED_ALPHA = 0.6  # the paper's recommended setting
RECOMMENDED_BETA = 0.1
# Noise is drawn per chunk of this many elements. Part of the determinism contract: changing
# it changes every perturbed checkpoint.
CHUNK_ELEMENTS = 1 << 20
COPY_CHUNK_BYTES = 8 << 20  # bytes per piece when copying a tensor unchanged

# Names of output (LM head) and input (token) embeddings, for tied weights.
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight")
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                    "embed_in.weight", "tok_embeddings.weight")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PerturbOptions:
    """Checked options of the noise step."""

    alpha: float
    beta: float
    seed: int = 0
    noise: str = "xavier-uniform"
    include: tuple[re.Pattern, ...] = ()
    exclude: tuple[re.Pattern, ...] = ()

    def selects(self, name: str) -> bool:
        """Whether tensor `name` is perturbed at all (else it is copied unchanged)."""
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)


def _patterns(value: str | Iterable[str] | None, option: str) -> tuple[re.Pattern, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else list(value)
    patterns = []
    for v in values:
        try:
            patterns.append(re.compile(v))
        except re.error as e:
            raise UsageError(f"{option} {v!r} is not a valid regular expression ({e})") from e
    return tuple(patterns)


def make_options(alpha: float, beta: float, seed: int = 0, noise: str = "xavier-uniform",
                 include: str | Iterable[str] | None = None,
                 exclude: str | Iterable[str] | None = None) -> PerturbOptions:
    """Check the noise-step options; raise `UsageError` saying what is wrong."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise UsageError(f"--alpha must be between 0 and 1 (the fraction of each weight "
                         f"replaced by noise), got {alpha}")
    if (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0
            or math.isinf(beta)):
        raise UsageError(f"--beta must be a finite number >= 0 (the noise scale), got {beta}")
    if noise not in NOISES:
        raise UsageError(f"unknown noise {noise!r}; choose one of {', '.join(NOISES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"--seed must be an integer, got {seed!r}")
    return PerturbOptions(alpha=float(alpha), beta=float(beta), seed=seed, noise=noise,
                          include=_patterns(include, "--include"),
                          exclude=_patterns(exclude, "--exclude"))


# --------------------------------------------------------------------------------------------
# The noise itself
# --------------------------------------------------------------------------------------------

def fan_in_and_fan_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """Fan-in and fan-out of a weight of `shape` (2+ dims), as torch's Xavier init."""
    if len(shape) < 2:
        raise ValueError("fan-in and fan-out need a tensor with at least 2 dimensions")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def noise_scale(shape: tuple[int, ...], noise: str) -> float:
    """The Xavier bound (uniform) or standard deviation (normal) for a weight of `shape`."""
    fan_in, fan_out = fan_in_and_fan_out(shape)
    if fan_in + fan_out == 0:
        return 0.0
    if noise == "xavier-uniform":
        return math.sqrt(6.0 / (fan_in + fan_out))
    if noise == "xavier-normal":
        return math.sqrt(2.0 / (fan_in + fan_out))
    raise UsageError(f"unknown noise {noise!r}; choose one of {', '.join(NOISES)}")


def chunk_generator(seed: int, name: str, chunk: int) -> np.random.SFC64:
    """The bit generator of chunk `chunk` of tensor `name`: SFC64 seeded from a hash of all
    three. (SFC64's stream is stable across numpy versions.)"""
    digest = hashlib.blake2b(f"undo-perturb\0{seed}\0{name}\0{chunk}".encode(),
                             digest_size=16).digest()
    return np.random.SFC64(int.from_bytes(digest, "little"))


def draw_noise(bits: np.random.SFC64, kind: str, scale: float, out: np.ndarray) -> np.ndarray:
    """Fill fp32 `out` with Xavier noise of bound / standard deviation `scale`.

    Uniform: each 32-bit half of SFC64's 64-bit outputs (low half first) gives 23 mantissa
    bits of f in [1, 2), and N = (f - 1.5) * 2b, uniform on [-b, b) (f - 1.5 is exact).
    Normal: numpy's standard normal (ziggurat) on the same generator, times the std.
    """
    if kind == "xavier-uniform":
        raw = bits.random_raw((out.size + 1) // 2).view(np.uint32)[:out.size]
        np.right_shift(raw, 9, out=raw)
        np.bitwise_or(raw, 0x3F800000, out=raw)
        np.subtract(raw.view(np.float32), np.float32(1.5), out=out)
        np.multiply(out, np.float32(2.0 * scale), out=out)
    else:
        np.random.Generator(bits).standard_normal(out=out, dtype=np.float32)
        np.multiply(out, np.float32(scale), out=out)
    return out


def tensor_action(name: str, shape: tuple[int, ...], is_float: bool,
                  options: PerturbOptions) -> str:
    """What happens to a tensor: "noise" (2+ dims), "shrink" (1-D or 0-D), or "copy"."""
    if not is_float or not options.selects(name) or options.alpha == 0:
        return "copy"
    if len(shape) >= 2 and options.beta > 0:
        return "noise"
    return "shrink"


class _Buffers:
    """Reusable scratch arrays for one chunk in flight (saves a page fault per byte)."""

    def __init__(self) -> None:
        self._raw: dict[str, np.ndarray] = {}

    def get(self, slot: str, dtype: type[np.generic], count: int) -> np.ndarray:
        """`count` elements of `dtype` in scratch area `slot` (grown when too small)."""
        nbytes = count * np.dtype(dtype).itemsize
        raw = self._raw.get(slot)
        if raw is None or raw.size < nbytes:
            raw = self._raw[slot] = np.empty(max(nbytes, 64), dtype=np.uint8)
        return raw[:nbytes].view(dtype)

    def raw(self, slot: str, nbytes: int) -> np.ndarray:
        """A uint8 scratch area of at least `nbytes`."""
        return self.get(slot, np.uint8, nbytes)


# safetensors float dtypes numpy computes with directly.
_NUMPY_FLOATS = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def _widen(raw: np.ndarray, dtype: str, out: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """`factor` times the elements stored in `raw` (bytes of `dtype`), in `out` (fp32, or
    fp64 for F64): one correctly rounded multiplication in `out`'s precision."""
    factor = out.dtype.type(factor)
    if dtype in _NUMPY_FLOATS:  # widening is exact, so convert and scale in one pass
        np.multiply(raw.view(_NUMPY_FLOATS[dtype]), factor, out=out)
        return out
    if dtype == "BF16":  # bf16 is the top half of an fp32
        np.left_shift(raw.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:  # float8 kinds: torch knows them
        import torch

        wide = torch.from_numpy(raw.copy()).view(torch_dtype(dtype)).float()  # raw: read-only
        np.copyto(out, wide.numpy())
    if factor != 1:
        np.multiply(out, factor, out=out)
    return out


def _narrow(work: np.ndarray, dtype: str, scratch: Callable[[str, type], np.ndarray]
            ) -> np.ndarray:
    """fp32 (fp64) `work` rounded to nearest-even in `dtype`, as bytes."""
    if dtype in ("F32", "F64"):
        return work.view(np.uint8)
    if dtype == "F16":
        out = scratch("out", np.float16)
        with np.errstate(over="ignore"):  # beyond fp16's range is inf, as in torch
            np.copyto(out, work, casting="same_kind")
        return out.view(np.uint8)
    if dtype == "BF16":
        bits = work.view(np.uint32)
        tmp = scratch("bits", np.uint32)
        np.right_shift(bits, 16, out=tmp)  # round to nearest, ties to even:
        np.bitwise_and(tmp, 1, out=tmp)  # (bits + 0x7fff + lowest kept bit) >> 16
        np.add(tmp, 0x7FFF, out=tmp)
        np.add(tmp, bits, out=tmp)
        np.right_shift(tmp, 16, out=tmp)
        out = scratch("out", np.uint16)
        np.copyto(out, tmp, casting="unsafe")
        nan = np.isnan(work)
        if nan.any():
            out[nan] = 0x7FC0  # the quiet NaN torch writes
        return out.view(np.uint8)
    import torch

    narrow = torch.from_numpy(work).to(torch_dtype(dtype))
    out = scratch("out", np.uint8)
    np.copyto(out, narrow.view(torch.uint8).numpy())
    return out


def _perturb_chunk(raw: np.ndarray | None, *, action: str, key: str, chunk: int, count: int,
                   scale: float, dtype: str, options: PerturbOptions,
                   buffers: _Buffers | None = None) -> np.ndarray:
    """Chunk `chunk` (`count` elements, flat) of a perturbed tensor, as bytes of `dtype`.

    `raw` holds the bytes of the original elements (may be None when alpha = 1) and is not
    modified. With N from `draw_noise`, in fp32 (fp64 for F64), each step a single correctly
    rounded operation::

        out = (1 - alpha) * w + (alpha * beta) * N

    then rounded once to `dtype`. With `buffers`, the result lives in them (and must be used
    before they are reused).
    """
    bufs = buffers if buffers is not None else _Buffers()

    def scratch(slot: str, dt: type) -> np.ndarray:
        return bufs.get(slot, dt, count)

    alpha, beta = options.alpha, options.beta
    work_type = np.float64 if dtype == "F64" else np.float32
    shrunk = None
    if alpha != 1.0:
        shrunk = _widen(raw, dtype, scratch("work", work_type), 1.0 - alpha)
    if action == "shrink":
        result = shrunk if shrunk is not None else scratch("work", work_type)
        if shrunk is None:
            result.fill(0)
    else:
        noise = draw_noise(chunk_generator(options.seed, key, chunk), options.noise, scale,
                           scratch("noise", np.float32))
        if work_type is not np.float32:
            wide = scratch("noise64", work_type)
            np.copyto(wide, noise)
            noise = wide
        np.multiply(noise, work_type(alpha * beta), out=noise)
        if shrunk is not None:
            np.add(noise, shrunk, out=noise)
        result = noise
    return _narrow(result, dtype, scratch)


def perturb_tensor(name: str, tensor: torch.Tensor, alpha: float, beta: float, seed: int = 0,
                   noise: str = "xavier-uniform", *, key: str | None = None,
                   threads: int | None = None) -> torch.Tensor:
    """The noise step applied to one in-memory tensor; returns a new tensor (same dtype, shape
    and device). Identical to what `perturb_checkpoint` writes for a tensor of that name.

    `key` names the noise (default `name`; tied weights use the input embedding's name).
    Include/exclude filters are not applied here (see `perturb_state_dict`).
    """
    options = make_options(alpha, beta, seed, noise)
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
        start = chunk * CHUNK_ELEMENTS
        count = min(CHUNK_ELEMENTS, n - start)
        out[start * size:(start + count) * size] = _perturb_chunk(
            raw[start * size:(start + count) * size], action=action, key=key, chunk=chunk,
            count=count, scale=scale, dtype=dtype, options=options)

    chunks = range(math.ceil(n / CHUNK_ELEMENTS))
    workers = _threads(threads)
    if workers > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, chunks))
    else:
        for chunk in chunks:
            run(chunk)
    return torch.from_numpy(out).view(src.dtype).reshape(src.shape).to(tensor.device)


def tied_embeddings(names: Iterable[str], tie_word_embeddings: bool) -> dict[str, str]:
    """{output embedding name: input embedding name} when the two are tied, else {}.

    Found by name (`lm_head.weight` with `...embed_tokens.weight`, `...wte.weight`, ...).
    """
    if not tie_word_embeddings:
        return {}
    names = list(names)
    outputs = [n for n in names if n in OUTPUT_EMBEDDINGS]
    inputs = [n for n in names if n.endswith(INPUT_EMBEDDINGS)]
    if len(outputs) == 1 and len(inputs) == 1:
        return {outputs[0]: inputs[0]}
    return {}


def perturb_state_dict(state_dict: dict[str, torch.Tensor], alpha: float, beta: float,
                       seed: int = 0, noise: str = "xavier-uniform", *,
                       include: str | Iterable[str] | None = None,
                       exclude: str | Iterable[str] | None = None,
                       tie_word_embeddings: bool = False,
                       threads: int | None = None) -> dict[str, torch.Tensor]:
    """The noise step on a state dict; returns new tensors (the input is not modified).

    Gives the same values as `perturb_checkpoint` on a checkpoint of this state dict. Names
    sharing one tensor (tied weights) get one perturbed tensor, keyed by the input
    embedding's name when `tie_word_embeddings` (else by the first name).
    """
    options = make_options(alpha, beta, seed, noise, include, exclude)
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
    out: dict[str, torch.Tensor] = {}
    for members in groups.values():
        key = next((ties[m] for m in members if m in ties), members[0])
        if key not in members:
            key = members[0]
        value = _perturb_in_memory(key, state_dict[key], options, threads)
        for m in members:
            out[m] = value
    return {name: out[name] for name in state_dict}


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


def perturb_model_(model, alpha: float, beta: float, seed: int = 0,
                   noise: str = "xavier-uniform", *, include: str | Iterable[str] | None = None,
                   exclude: str | Iterable[str] | None = None,
                   threads: int | None = None):
    """Apply the noise step to a loaded model in place (same values as `undo perturb` on its
    saved checkpoint); returns the model."""
    import torch

    state = model.state_dict()
    tie = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    new = perturb_state_dict(state, alpha, beta, seed, noise, include=include,
                             exclude=exclude, tie_word_embeddings=tie, threads=threads)
    done: set[int] = set()
    with torch.no_grad():
        for name, tensor in state.items():
            if id(new[name]) in done:
                continue
            done.add(id(new[name]))
            tensor.copy_(new[name])
    return model


def _threads(threads: int | None) -> int:
    if threads is None:
        try:
            cpus = len(os.sched_getaffinity(0))  # the cores this process may use
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        return max(1, min(8, cpus))
    if threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    return threads


# --------------------------------------------------------------------------------------------
# Streaming a checkpoint
# --------------------------------------------------------------------------------------------

@dataclass
class _Job:
    """One output tensor: where its values come from and what happens to them."""

    spec: TensorSpec  # as written
    source: str  # input tensor whose values are used (the input embedding for a tied head)
    key: str  # name keying the noise
    action: str  # "noise", "shrink" or "copy"
    scale: float = 0.0
    readback_of: str | None = None  # an output tensor already written with the same bytes
    file: int = 0  # index of the output file


@dataclass
class _Item:
    job: _Job
    kind: str  # "compute" (elements), "copy" (bytes) or "readback" (bytes, done inline)
    start: int
    count: int


@dataclass
class PerturbPlan:
    """Everything decided before writing: layout of the output and what happens to each
    tensor."""

    files: list[tuple[str, list[TensorSpec], dict[str, str]]]
    jobs: list[_Job]
    write_index: bool
    index_metadata: dict = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(job.spec.nbytes for job in self.jobs)


def _config_ties(path: Path) -> bool:
    """`tie_word_embeddings` of a checkpoint's config (the model type's default if unset)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    try:
        from transformers import AutoConfig

        return bool(getattr(AutoConfig.from_pretrained(path), "tie_word_embeddings", False))
    except Exception:  # noqa: BLE001 - an unknown model type: never guess a tie
        return False


def plan_perturbation(reader: CheckpointReader, options: PerturbOptions, *,
                      max_shard_size: int | None = None,
                      tie_word_embeddings: bool = False) -> PerturbPlan:
    """Decide the output files (like the input, or split by `max_shard_size`) and the jobs."""
    entries = reader.entries
    ties = {a: c for a, c in tied_embeddings(entries, tie_word_embeddings).items()
            if entries[a].spec().shape == entries[c].spec().shape
            and entries[a].dtype == entries[c].dtype}
    if max_shard_size:
        ordered = sorted((e.spec() for e in entries.values()), key=lambda s: natural_key(s.name))
        groups = split_shards(ordered, max_shard_size)
        metadata: dict[str, str] = {}
        for f in reader.files:
            metadata.update(f.metadata)
        metadata["format"] = "pt"
        files = [(name, file_order(g), dict(sorted(metadata.items())))
                 for name, g in zip(shard_file_names(len(groups)), groups)]
        index = len(files) > 1
        index_metadata: dict = {}
    else:
        files = [(f.path.name if reader.path.is_dir() else SINGLE_NAME,
                  file_order(e.spec() for e in f.entries.values()),
                  {**f.metadata, "format": f.metadata.get("format", "pt")})
                 for f in reader.files]
        index = len(files) > 1 or (reader.path / INDEX_NAME).is_file()
        index_metadata = {k: v for k, v in reader.index_metadata.items() if k != "total_size"}
    jobs: list[_Job] = []
    first_written: dict[str, str] = {}  # canonical name -> first output tensor of its group
    for i, (_, specs, _) in enumerate(files):
        for spec in specs:
            canonical = ties.get(spec.name, spec.name)
            entry = entries[canonical]
            action = tensor_action(canonical, entry.shape, entry.is_float, options)
            job = _Job(spec=spec, source=canonical, key=canonical, action=action, file=i)
            if action == "noise":
                job.scale = noise_scale(entry.shape, options.noise)
            if canonical in ties.values() or spec.name in ties:
                if canonical in first_written:
                    job.readback_of = first_written[canonical]
                else:
                    first_written[canonical] = spec.name
            jobs.append(job)
    return PerturbPlan(files=files, jobs=jobs, write_index=index,
                       index_metadata=index_metadata, ties=ties)


def _items(jobs: list[_Job]) -> Iterator[_Item]:
    for job in jobs:
        nbytes = job.spec.nbytes
        if job.readback_of is not None:
            for start in range(0, nbytes, COPY_CHUNK_BYTES):
                yield _Item(job, "readback", start, min(COPY_CHUNK_BYTES, nbytes - start))
        elif job.action == "copy":
            for start in range(0, nbytes, COPY_CHUNK_BYTES):
                yield _Item(job, "copy", start, min(COPY_CHUNK_BYTES, nbytes - start))
        else:
            n = job.spec.numel
            for start in range(0, n, CHUNK_ELEMENTS):
                yield _Item(job, "compute", start, min(CHUNK_ELEMENTS, n - start))


def _ordered_results(pool: ThreadPoolExecutor, items: Iterator[_Item],
                     fn: Callable[[_Item, _Buffers], np.ndarray], window: int
                     ) -> Iterator[tuple[_Item, np.ndarray | None, _Buffers]]:
    """Run `fn(item, buffers)` on the pool's threads, at most `window` items ahead, yielding
    `(item, result, buffers)` in order; the buffers are reused once the consumer moves on.
    "readback" items are not run (they need the bytes written before them)."""
    free = [_Buffers() for _ in range(window)]
    pending: deque = deque()
    while True:
        while free:
            item = next(items, None)
            if item is None:
                break
            bufs = free.pop()
            future = None if item.kind == "readback" else pool.submit(fn, item, bufs)
            pending.append((item, future, bufs))
        if not pending:
            return
        item, future, bufs = pending.popleft()
        yield item, (future.result() if future is not None else None), bufs
        free.append(bufs)


def write_perturbed(reader: CheckpointReader, plan: PerturbPlan, directory: Path,
                    options: PerturbOptions, *, threads: int | None = None,
                    progress: Callable[[int], None] | None = None) -> list[str]:
    """Write the perturbed weights of `plan` into `directory`; returns the file names."""
    workers = _threads(threads)

    def compute(item: _Item, bufs: _Buffers) -> np.ndarray:
        job = item.job
        if item.kind == "copy":
            return reader.view_bytes(job.source, item.start, item.count)
        entry = reader.entries[job.source]
        # With alpha = 1 nothing of the original survives: skip reading it.
        w = None
        if options.alpha != 1.0:
            w = reader.view_bytes(job.source, item.start * entry.itemsize,
                                  item.count * entry.itemsize)
        return _perturb_chunk(w, action=job.action, key=job.key,
                              chunk=item.start // CHUNK_ELEMENTS, count=item.count,
                              scale=job.scale, dtype=entry.dtype, options=options,
                              buffers=bufs)

    writers: list[SafetensorsWriter] = []
    written: dict[str, tuple[Path, int]] = {}  # output tensor -> (file, offset)
    readback_fds: dict[Path, int] = {}

    def writer_for(file: int) -> SafetensorsWriter:
        while len(writers) <= file:
            if writers:
                writers[-1].close()
            name, specs, metadata = plan.files[len(writers)]
            writers.append(SafetensorsWriter(directory / name, specs, metadata))
        return writers[file]

    def read_back(item: _Item, bufs: _Buffers) -> np.ndarray:
        """The bytes of an already written tensor (the tied partner computed first)."""
        path, offset = written[item.job.readback_of]
        fd = readback_fds.get(path)
        if fd is None:
            fd = readback_fds[path] = os.open(path, os.O_RDONLY)
        return pread_exact(fd, offset + item.start, item.count, path,
                           out=bufs.raw("read", item.count))

    pool = ThreadPoolExecutor(workers, thread_name_prefix="undo-perturb")
    try:
        results = _ordered_results(pool, _items(plan.jobs), compute, workers + 2)
        for item, data, bufs in results:
            job = item.job
            writer = writer_for(job.file)
            if item.start == 0:
                written[job.spec.name] = (writer.path, writer.offsets[job.spec.name])
            if item.kind == "readback":
                data = read_back(item, bufs)
            writer.write(job.spec.name, data)
            if item.kind == "copy":
                reader.release(job.source, item.start, item.count)
            elif item.kind == "compute" and options.alpha != 1.0:
                size = job.spec.itemsize
                reader.release(job.source, item.start * size, item.count * size)
            if progress is not None:
                progress(item.count if item.kind != "compute"
                         else item.count * job.spec.itemsize)
        if plan.files:
            writer_for(len(plan.files) - 1).close()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for w in writers:
            w.abort()  # no-op for the ones already closed
        for fd in readback_fds.values():
            os.close(fd)
    if plan.write_index:
        write_index(directory, [(name, specs) for name, specs, _ in plan.files],
                    plan.index_metadata)
    return [name for name, _, _ in plan.files]


def _summary_counts(plan: PerturbPlan) -> dict[str, int]:
    counts = {"noised": 0, "shrunk": 0, "copied": 0, "tied_copies": 0,
              "parameters_noised": 0, "parameters_shrunk": 0}
    for job in plan.jobs:
        if job.readback_of is not None:
            counts["tied_copies"] += 1
            continue
        if job.action == "noise":
            counts["noised"] += 1
            counts["parameters_noised"] += job.spec.numel
        elif job.action == "shrink":
            counts["shrunk"] += 1
            counts["parameters_shrunk"] += job.spec.numel
        else:
            counts["copied"] += 1
    return counts


def perturb_checkpoint(src: str | Path, dst: str | Path, alpha: float, beta: float,
                       seed: int = 0, noise: str = "xavier-uniform", *,
                       include: str | Iterable[str] | None = None,
                       exclude: str | Iterable[str] | None = None,
                       max_shard_size: int | str | None = None, overwrite: bool = False,
                       threads: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a noised copy of checkpoint `src` to `dst` (streamed; see the module docstring).

    The output is sharded like the input, or by `max_shard_size` ("2GB", bytes); it is
    written atomically (nothing at `dst` unless everything succeeded) with the input's
    config/tokenizer files and an `undo.json` manifest. `progress(done, total)` is called
    with bytes of tensor data written. Returns a summary dict.
    """
    from undo_cli.checkpoint import (
        atomic_output,
        build_manifest,
        check_output_path,
        copy_support_files,
        inspect_checkpoint,
        write_manifest,
    )

    start = time.time()
    options = make_options(alpha, beta, seed, noise, include, exclude)
    shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    _threads(threads)
    src, dst = Path(src), Path(dst)
    info = inspect_checkpoint(src, allow_pickle=True)
    if info.kind == "adapter":
        raise UsageError(f"{src} is a PEFT adapter; merge it into its base model first "
                         "(undo perturb works on full checkpoints)")
    if info.pickled:
        raise UsageError(f"{src} holds only pickled weights ({info.weight_files[0].name}); "
                         "undo perturb streams safetensors checkpoints only")
    check_output_path(dst, inputs=[src], overwrite=overwrite)
    with CheckpointReader(src) as reader:
        plan = plan_perturbation(reader, options, max_shard_size=shard_bytes,
                                 tie_word_embeddings=_config_ties(src))
        total = plan.total_bytes
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        counts = _summary_counts(plan)
        arguments = {"input": str(src), "output": str(dst), "alpha": options.alpha,
                     "beta": options.beta, "seed": seed, "noise": noise,
                     "include": [p.pattern for p in options.include],
                     "exclude": [p.pattern for p in options.exclude],
                     "max_shard_size": max_shard_size}
        with atomic_output(dst, inputs=[src], overwrite=overwrite) as tmp, \
                ThreadPoolExecutor(1, thread_name_prefix="undo-manifest") as background:
            # Fingerprinting the input reads all of it: do it while the weights are written.
            manifest = background.submit(
                build_manifest, "perturb", arguments=arguments, parents={"input": src},
                seed=seed, extra={"perturb": counts})
            files = write_perturbed(reader, plan, tmp, options, threads=threads,
                                    progress=advance)
            copy_support_files(src, tmp)
            manifest = manifest.result()
            manifest["wall_time_s"] = round(time.time() - start, 3)
            write_manifest(tmp, manifest)
    return {"input": str(src), "output": str(dst), "alpha": options.alpha,
            "beta": options.beta, "seed": seed, "noise": noise, "files": files,
            "bytes_written": total, **counts,
            "tied_weights": dict(plan.ties),
            "wall_time_s": round(time.time() - start, 3)}
