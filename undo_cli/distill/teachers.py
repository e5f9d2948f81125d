"""Where the teacher's targets come from, as wrappers of the batch stream: `TeacherCache`
(the teacher's top-k outputs stored on disk and read back) and `TeacherSwitch` (which
micro-batches take their targets from a second teacher)."""

from __future__ import annotations

import hashlib
import json
import os
from fractions import Fraction
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from undo_cli.distill.loss import SECOND_TEACHER_KEY, final_hidden, output_logits
from undo_cli.errors import UsageError
from undo_cli.losses import next_token_mask

CACHE_INFO = "cache.json"
TOKENS_KEY = "global_tokens"  # metadata of a cached micro-batch: its tokens over all processes
TARGETS_KEY = "global_targets"  # ... and its predicted tokens


class TeacherCache:
    """A batch stream wrapper that stores (or reads back) the teacher's top-k outputs.

    Each micro-batch `i` of the wrapped stream is kept in `DIR/mb-{i}-r{rank}of{world}.safetensors`
    with its inputs and, for every distilled position, the teacher's `k` largest
    log-probabilities (at the distillation temperature) and their token ids. A later run with
    the same teacher, data, seed, batch size, sequence length, temperature and k reads batches
    from the cache instead of running the teacher, so a sweep over alpha pays for the teacher
    once. Batches beyond the cached ones are computed and added. `DIR/cache.json` holds the key;
    a cache made with other settings is refused.
    """

    def __init__(self, stream, teacher, directory: str | Path, key: dict, *, k: int,
                 temperature: float = 1.0, device: torch.device | None = None):
        self.stream, self.teacher = stream, teacher
        self.directory = Path(directory)
        self.k, self.temperature = k, temperature
        self.device = device
        self.rank, self.world = 0, 1
        self.key = {**key, "k": k, "temperature": temperature}
        self.hits = 0
        self.teacher_tokens = 0  # tokens the teacher was run on (FLOP accounting)
        info_file = self.directory / CACHE_INFO
        if info_file.is_file():
            stored = json.loads(info_file.read_text())
            if stored != json.loads(json.dumps(self.key)):
                diff = sorted(k for k in set(stored) | set(self.key)
                              if stored.get(k) != json.loads(json.dumps(self.key)).get(k))
                raise UsageError(f"--cache-teacher {directory} was made with other settings "
                                 f"({', '.join(diff)} differ); use another directory")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            info_file.write_text(json.dumps(self.key, indent=2) + "\n")

    # The engine talks to streams through these.
    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.stream.shard(rank, world)
        self.key["processes"] = world

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self):
        return self

    def _file(self, index: int) -> Path:
        return self.directory / f"mb-{index:08d}-r{self.rank}of{self.world}.safetensors"

    def __next__(self) -> dict[str, torch.Tensor]:
        index = self.stream.position
        file = self._file(index)
        if file.is_file():
            with safe_open(str(file), "pt") as f:
                batch = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
                meta = f.metadata() or {}
            self.stream.position = index + 1  # batches are a pure function of the position
            # The engine counts tokens from the stream's `last_tokens` and `last_targets` (the
            # global micro-batch, all processes): restore the counts stored with the batch
            # (None: the engine counts this process's tokens times the processes).
            for attribute, key in (("last_tokens", TOKENS_KEY), ("last_targets", TARGETS_KEY)):
                stored = meta.get(key)
                setattr(self.stream, attribute, int(stored) if stored is not None else None)
            self.hits += 1
            return batch
        batch = next(self.stream)
        mask = next_token_mask(batch["labels"])
        device = self.device or next(self.teacher.parameters()).device
        with torch.no_grad():
            on_device = {k: v.to(device) for k, v in batch.items()}
            hidden = final_hidden(self.teacher, on_device)[mask.to(device)]
            logprobs = torch.log_softmax(
                output_logits(self.teacher, hidden).float() / self.temperature, dim=-1)
            top_lp, top_ids = logprobs.topk(min(self.k, logprobs.shape[-1]), dim=-1)
        self.teacher_tokens += int(batch["attention_mask"].sum()) * self.world
        batch = {**batch, "teacher_topk_logprobs": top_lp.cpu().contiguous(),
                 "teacher_topk_ids": top_ids.to(torch.int32).cpu().contiguous()}
        tmp = file.with_name(file.name + ".tmp")
        counts = {key: getattr(self.stream, attribute, None) for attribute, key in
                  (("last_tokens", TOKENS_KEY), ("last_targets", TARGETS_KEY))}
        save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp),
                  metadata={k: str(v) for k, v in counts.items() if v is not None} or None)
        os.replace(tmp, file)
        return batch


class TeacherSwitch:
    """A batch stream wrapper that marks the micro-batches whose targets come from the second
    teacher (`SECOND_TEACHER_KEY` set to 1, else 0).

    Micro-batch i (the stream's position, counted over the run and the same on every
    process) goes to the second teacher when floor((i + 1) P + o) > floor(i P + o), with P
    the fraction and o in [0, 1) drawn from the seed, in exact rational arithmetic: any n
    consecutive micro-batches hold floor(n P) or ceil(n P) second-teacher ones, spread evenly,
    and the same seed marks the same micro-batches (also after `--resume`). `batches` and
    `tokens` count, per teacher (0 first, 1 second), the micro-batches and tokens drawn.
    """

    def __init__(self, stream, fraction: float, seed: int):
        if not 0 < fraction <= 1:
            raise UsageError(f"--second-teacher-fraction must lie in (0, 1] (got {fraction})")
        self.stream = stream
        self.fraction = Fraction(fraction)
        digest = hashlib.blake2b(f"undo-second-teacher\0{seed}".encode(),
                                 digest_size=8).digest()
        self.offset = Fraction(int.from_bytes(digest, "little"), 1 << 64)
        self.batches = [0, 0]
        self.tokens = [0, 0]

    def uses_second(self, index: int) -> bool:
        """Whether micro-batch `index` takes its targets from the second teacher."""
        p, o = self.fraction, self.offset
        return int((index + 1) * p + o) > int(index * p + o)  # floors: both are >= 0

    # The engine talks to streams through these.
    def shard(self, rank: int, world: int) -> None:
        self.stream.shard(rank, world)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)

    def state_dict(self) -> dict:
        return {**self.stream.state_dict(), "teacher_batches": list(self.batches),
                "teacher_tokens": list(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.batches = list(state.pop("teacher_batches", [0, 0]))
        self.tokens = list(state.pop("teacher_tokens", [0, 0]))
        self.stream.load_state_dict(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        index = self.stream.position
        batch = next(self.stream)
        second = int(self.uses_second(index))
        tokens = getattr(self.stream, "last_tokens", None)
        if tokens is None:
            tokens = int(batch["attention_mask"].sum())
        self.batches[second] += 1
        self.tokens[second] += int(tokens)
        return {**batch, SECOND_TEACHER_KEY: torch.tensor(second)}

    def describe_use(self) -> dict:
        """The manifest's record of what the second teacher did."""
        total = sum(self.batches)
        return {"fraction": float(self.fraction), "unit": "micro-batch",
                "batches": self.batches[1], "of_batches": total,
                "realised_fraction": self.batches[1] / total if total else None,
                "tokens": self.tokens[1], "first_teacher_tokens": self.tokens[0]}
