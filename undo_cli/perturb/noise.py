"""The noise step's arithmetic on raw tensor bytes, in numpy (no torch): the options, the
Xavier scale of a tensor, the seeded noise of each chunk, and one chunk's result. Both the
streaming command (`stream.py`) and the in-memory path (`memory.py`) call `perturb_chunk`, so
they give the same bytes."""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from undo_cli.errors import UsageError
from undo_cli.layers import resolve_layers
from undo_cli.options import NOISES, NoiseOptions, compile_pattern

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


@dataclass(frozen=True)
class PerturbOptions:
    """Checked options of the noise step."""

    alpha: float
    beta: float
    seed: int = 0
    noise: str = "xavier-uniform"
    include: tuple[re.Pattern, ...] = ()
    exclude: tuple[re.Pattern, ...] = ()
    layers: re.Pattern | None = None  # --layers, resolved to the model's tensor names
    only: frozenset[str] | None = None  # exactly these names (distill: the trained ones)

    def selects(self, name: str) -> bool:
        """Whether tensor `name` is perturbed at all (else it is copied unchanged): it is in
        `only` (if set), in the `layers` (if set), matches an `include` pattern (if any) and
        no `exclude` pattern."""
        if self.only is not None and name not in self.only:
            return False
        if self.layers is not None and not self.layers.search(name):
            return False
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)


def resolve_noise(settings: NoiseOptions, seed: int = 0, *, names: Iterable[str] = (),
                  model_type: str | None = None, only: Iterable[str] | None = None
                  ) -> tuple[PerturbOptions, tuple[tuple[int, ...], str] | None]:
    """The noise step decided for one model: `settings` (an option group, checked when it was
    built) with its `--layers` resolved against the model's tensor `names` (`model_type`
    picks the layer container; `undo_cli.layers.resolve_layers`) and `only`, if given, the
    exact tensor names allowed. Returns the options and the layer selection (None: all).

    `UsageError` if `settings` has no alpha (the noise step was not asked for) or a layer
    the model does not have."""
    if settings.alpha is None:  # (beta goes with it: checked when `settings` was built)
        raise UsageError("the noise step needs --alpha and --beta")
    selection = resolve_layers(settings.layers, names, model_type) if settings.layers else None
    options = PerturbOptions(
        alpha=float(settings.alpha), beta=float(settings.beta), seed=seed, noise=settings.noise,
        include=_patterns(settings.include, "--include"),
        exclude=_patterns(settings.exclude, "--exclude"),
        layers=re.compile(selection[1]) if selection else None,
        only=frozenset(only) if only is not None else None)
    return options, selection


def _patterns(values: Iterable[str], flag: str) -> tuple[re.Pattern, ...]:
    """The compiled patterns of `--include`/`--exclude` (a list, parsed when the group was
    built: each `Pattern` gives its regex)."""
    return tuple(compile_pattern(flag, v) for v in values)


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


class Buffers:
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
    else:  # float8 kinds: numpy has none, torch knows them
        from undo_cli.perturb.float8 import widen_float8

        np.copyto(out, widen_float8(raw, dtype))
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
    from undo_cli.perturb.float8 import narrow_to_float8

    out = scratch("out", np.uint8)
    np.copyto(out, narrow_to_float8(work, dtype))
    return out


def has_nonfinite(raw: np.ndarray, dtype: str) -> bool:
    """Whether bytes `raw` of float dtype `dtype` hold a NaN or an infinity."""
    if dtype in _NUMPY_FLOATS:
        return not bool(np.isfinite(raw.view(_NUMPY_FLOATS[dtype])).all())
    if dtype == "BF16":  # exponent bits all ones
        return bool(np.any((raw.view(np.uint16) & 0x7F80) == 0x7F80))
    if dtype == "F8_E5M2":
        return bool(np.any((raw & 0x7C) == 0x7C))
    if dtype == "F8_E4M3":  # no infinities; NaN is S.1111.111
        return bool(np.any((raw & 0x7F) == 0x7F))
    return False


def perturb_chunk(raw: np.ndarray | None, *, action: str, key: str, chunk: int, count: int,
                   scale: float, dtype: str, options: PerturbOptions,
                   buffers: Buffers | None = None) -> np.ndarray:
    """Chunk `chunk` (`count` elements, flat) of a perturbed tensor, as bytes of `dtype`.

    `raw` holds the bytes of the original elements (may be None when alpha = 1) and is not
    modified. With N from `draw_noise`, in fp32 (fp64 for F64), each step a single correctly
    rounded operation::

        out = (1 - alpha) * w + (alpha * beta) * N

    then rounded once to `dtype`. With `buffers`, the result lives in them (and must be used
    before they are reused).
    """
    bufs = buffers if buffers is not None else Buffers()

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


def thread_count(threads: int | None) -> int:
    if threads is None:
        try:
            cpus = len(os.sched_getaffinity(0))  # the cores this process may use
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        return max(1, min(8, cpus))
    if threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    return threads


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
