"""`perturb_checkpoint`: the noise step streamed over a checkpoint's safetensors files, tensor
by tensor and chunk by chunk on a pool of threads, written as the same sharding (or
`max_shard_size`), with memory near one chunk per thread whatever the model's size."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from undo_cli.checkpoint.inspection import inspect_checkpoint
from undo_cli.checkpoint.manifest import build_manifest, write_manifest
from undo_cli.checkpoint.output import atomic_output, check_output_path, copy_support_files
from undo_cli.checkpoint.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointReader,
    SafetensorsWriter,
    TensorSpec,
    file_order,
    natural_key,
    pread_exact,
    shard_file_names,
    split_shards,
    write_index,
)
from undo_cli.errors import UndoError, UsageError
from undo_cli.options import NoiseOptions, SaveOptions
from undo_cli.perturb import noise
from undo_cli.perturb.noise import (
    Buffers,
    PerturbOptions,
    has_nonfinite,
    noise_scale,
    perturb_chunk,
    resolve_noise,
    tensor_action,
    thread_count,
    tied_embeddings,
)


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

    options: PerturbOptions  # the noise, resolved against the checkpoint's tensor names
    selection: tuple[tuple[int, ...], str] | None  # --layers: (layers, regex); None: all
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


def _model_type(path: Path) -> str | None:
    """`model_type` of a checkpoint's config.json (None when unreadable)."""
    try:
        value = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def plan_perturbation(reader: CheckpointReader, settings: NoiseOptions, seed: int = 0, *,
                      max_shard_size: int | None = None, tie_word_embeddings: bool = False,
                      model_type: str | None = None) -> PerturbPlan:
    """Decide everything before a byte is written: the noise resolved against the tensor
    names (`resolve_noise`), the output files (like the input, or split by `max_shard_size`
    bytes) and what happens to each tensor."""
    entries = reader.entries
    options, selection = resolve_noise(settings, seed, names=entries, model_type=model_type)
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
        # Shards keep their path relative to the checkpoint: two `model.safetensors` in
        # different subdirectories are two files.
        files = [(reader.relative(f.path) if reader.path.is_dir() else SINGLE_NAME,
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
    return PerturbPlan(options=options, selection=selection, files=files, jobs=jobs,
                       write_index=index,
                       index_metadata=index_metadata, ties=ties)


def _items(jobs: list[_Job]) -> Iterator[_Item]:
    for job in jobs:
        nbytes = job.spec.nbytes
        if job.readback_of is not None:
            for start in range(0, nbytes, noise.COPY_CHUNK_BYTES):
                yield _Item(job, "readback", start, min(noise.COPY_CHUNK_BYTES, nbytes - start))
        elif job.action == "copy":
            for start in range(0, nbytes, noise.COPY_CHUNK_BYTES):
                yield _Item(job, "copy", start, min(noise.COPY_CHUNK_BYTES, nbytes - start))
        else:
            n = job.spec.numel
            for start in range(0, n, noise.CHUNK_ELEMENTS):
                yield _Item(job, "compute", start, min(noise.CHUNK_ELEMENTS, n - start))


def _ordered_results(pool: ThreadPoolExecutor, items: Iterator[_Item],
                     fn: Callable[[_Item, Buffers], np.ndarray], window: int
                     ) -> Iterator[tuple[_Item, np.ndarray | None, Buffers]]:
    """Run `fn(item, buffers)` on the pool's threads, at most `window` items ahead, yielding
    `(item, result, buffers)` in order; the buffers are reused once the consumer moves on.
    "readback" items are not run (they need the bytes written before them)."""
    free = [Buffers() for _ in range(window)]
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


def _nonfinite(reader: CheckpointReader, job: _Job, noised: bool) -> UsageError:
    where = f"{reader.path}: tensor {job.source!r}"
    if noised:
        return UsageError(f"{where} would be written with NaN or infinite values (the noise "
                          f"overflows {job.spec.dtype}): lower --beta, or pass "
                          "--allow-nonfinite to write them anyway")
    return UsageError(f"{where} holds NaN or infinite values; perturb does not copy them "
                      "into OUT: pass --allow-nonfinite to write them anyway")


def write_perturbed(reader: CheckpointReader, plan: PerturbPlan, directory: Path, *,
                    threads: int | None = None,
                    progress: Callable[[int], None] | None = None,
                    allow_nonfinite: bool = False) -> list[str]:
    """Write the perturbed weights of `plan` into `directory`; returns the file names.

    `UsageError` naming the tensor if a float tensor would be written with NaN or infinite
    values (copied from the input, or from noise that overflows a narrow dtype), unless
    `allow_nonfinite`."""
    workers = thread_count(threads)
    options = plan.options

    def compute(item: _Item, bufs: Buffers) -> np.ndarray:
        job = item.job
        if item.kind == "copy":
            data = reader.view_bytes(job.source, item.start, item.count)
            if not allow_nonfinite and job.spec.is_float and has_nonfinite(data, job.spec.dtype):
                raise _nonfinite(reader, job, noised=False)
            return data
        entry = reader.entries[job.source]
        # With alpha = 1 nothing of the original survives: skip reading it.
        w = None
        if options.alpha != 1.0:
            w = reader.view_bytes(job.source, item.start * entry.itemsize,
                                  item.count * entry.itemsize)
        out = perturb_chunk(w, action=job.action, key=job.key,
                            chunk=item.start // noise.CHUNK_ELEMENTS, count=item.count,
                            scale=job.scale, dtype=entry.dtype, options=options,
                            buffers=bufs)
        if not allow_nonfinite and has_nonfinite(out, entry.dtype):
            raise _nonfinite(reader, job, noised=w is None or not has_nonfinite(w, entry.dtype))
        return out

    writers: list[SafetensorsWriter] = []
    written: dict[str, tuple[Path, int]] = {}  # output tensor -> (file, offset)
    readback_fds: dict[Path, int] = {}

    def writer_for(file: int) -> SafetensorsWriter:
        while len(writers) <= file:
            if writers:
                writers[-1].close()
            name, specs, metadata = plan.files[len(writers)]
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            writers.append(SafetensorsWriter(directory / name, specs, metadata))
        return writers[file]

    def read_back(item: _Item, bufs: Buffers) -> np.ndarray:
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


def verify_output(reader: CheckpointReader, directory: Path) -> None:
    """Check what was written: the output's files (and index) hold every input tensor, with
    the same shape and dtype, and nothing else; `UndoError` (nothing is written) otherwise."""
    with CheckpointReader(directory) as written:
        for name, entry in reader.entries.items():
            got = written.entries.get(name)
            if got is None or got.shape != entry.shape or got.dtype != entry.dtype:
                found = "missing" if got is None else f"{got.dtype} {list(got.shape)}"
                raise UndoError(f"perturb wrote tensor {name!r} wrongly ({found}, expected "
                                f"{entry.dtype} {list(entry.shape)}); nothing was written")
        extra = sorted(set(written.entries) - set(reader.entries))
        if extra:
            raise UndoError(f"perturb wrote tensors that are not in the input ({extra[:3]}); "
                            "nothing was written")


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


def perturb_checkpoint(src: str | Path, dst: str | Path,
                       settings: NoiseOptions = NoiseOptions(), *, seed: int = 0,
                       save: SaveOptions = SaveOptions(), overwrite: bool = False,
                       threads: int | None = None, allow_nonfinite: bool = False,
                       progress: Callable[[int, int], None] | None = None,
                       base_model: str | Path | None = None) -> dict:
    """Write a noised copy of checkpoint `src` to `dst` (streamed; see the module docstring):
    the noise step of `settings` (alpha, beta, the noise kind and the tensor selection) with
    noise seed `seed`.

    A PEFT adapter `src` is merged into its base (`base_model`, else the one its
    adapter_config.json names) in memory first (`undo_cli.perturb.memory.perturb_adapter`,
    which needs torch); the values are those of `undo perturb` on the merged checkpoint.

    The output is sharded like the input, or by `save.max_shard_size`; it is written
    atomically (nothing at `dst` unless everything succeeded) with the input's
    config/tokenizer files and an `undo.json` manifest, and checked before it is renamed into
    place (`verify_output`). NaN or infinite weights are refused unless `allow_nonfinite`.
    `progress(done, total)` is called with bytes of tensor data written. Everything is decided
    (`plan_perturbation`) before anything is written. Returns a summary dict.
    """
    start = time.time()
    thread_count(threads)
    src, dst = Path(src), Path(dst)
    info = inspect_checkpoint(src, allow_pickle=True, base_model=base_model)
    arguments = {"input": str(src), "output": str(dst), "alpha": settings.alpha,
                 "beta": settings.beta, "seed": seed, "noise": settings.noise,
                 "include": list(settings.include), "exclude": list(settings.exclude),
                 "max_shard_size": save.max_shard_size}
    if info.kind == "adapter":
        return _perturb_adapter(info, dst, settings, seed, save=save, overwrite=overwrite,
                                threads=threads, allow_nonfinite=allow_nonfinite,
                                progress=progress, arguments=arguments, start=start)
    if info.pickled:
        raise UsageError(f"{src} holds only pickled weights ({info.weight_files[0].name}); "
                         "undo perturb streams safetensors checkpoints only")
    check_output_path(dst, inputs=[src], overwrite=overwrite)
    with CheckpointReader(src) as reader:
        plan = plan_perturbation(reader, settings, seed, max_shard_size=_bytes(save),
                                 tie_word_embeddings=_config_ties(src),
                                 model_type=_model_type(src))
        total = plan.total_bytes
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        counts = _summary_counts(plan)
        selection = plan.selection
        arguments.update(layers=list(selection[0]) if selection else None,
                         layer_pattern=selection[1] if selection else None)
        with atomic_output(dst, inputs=[src], overwrite=overwrite) as tmp, \
                ThreadPoolExecutor(1, thread_name_prefix="undo-manifest") as background:
            # Fingerprinting the input reads all of it: do it while the weights are written.
            manifest = background.submit(
                build_manifest, "perturb", arguments=arguments, parents={"input": src},
                seed=seed, extra={"perturb": counts})
            files = write_perturbed(reader, plan, tmp, threads=threads, progress=advance,
                                    allow_nonfinite=allow_nonfinite)
            verify_output(reader, tmp)
            copy_support_files(src, tmp)
            manifest = manifest.result()
            manifest["wall_time_s"] = round(time.time() - start, 3)
            write_manifest(tmp, manifest)
    return {"input": str(src), "output": str(dst), "alpha": plan.options.alpha,
            "beta": plan.options.beta, "seed": seed, "noise": settings.noise, "files": files,
            "bytes_written": total, **counts,
            "layers": list(selection[0]) if selection else None,
            "tied_weights": dict(plan.ties),
            "wall_time_s": round(time.time() - start, 3)}


def _bytes(save: SaveOptions) -> int | None:
    """`--max-shard-size` in bytes (parsed when the group was built), or None."""
    return save.max_shard_size.bytes if save.max_shard_size is not None else None


def _perturb_adapter(info, dst: Path, settings: NoiseOptions, seed: int, *,
                     save: SaveOptions, overwrite: bool, threads: int | None,
                     allow_nonfinite: bool, progress: Callable[[int, int], None] | None,
                     arguments: dict, start: float) -> dict:
    from undo_cli.perturb.memory import perturb_adapter  # torch, for adapters only

    if info.pickled or info.base.pickled:
        raise UsageError(f"{info.path}: undo perturb reads safetensors only (the adapter or "
                         "its base is pickled)")
    check_output_path(dst, inputs=[info.path, info.base.path], overwrite=overwrite)
    arguments = {**arguments, "layers": settings.layers, "base_model": str(info.base.path)}
    counts = perturb_adapter(
        info, dst, settings, seed, shard_bytes=_bytes(save), overwrite=overwrite,
        threads=threads, allow_nonfinite=allow_nonfinite, arguments=arguments,
        progress=(lambda total: progress(total, total)) if progress is not None else None)
    return {"input": str(info.path), "output": str(dst), "alpha": settings.alpha,
            "beta": settings.beta, "seed": seed, "noise": settings.noise,
            "files": sorted(p.name for p in Path(dst).glob("*.safetensors")), **counts,
            "merged_adapter": str(info.base.path),
            "wall_time_s": round(time.time() - start, 3)}
