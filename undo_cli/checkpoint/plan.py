"""The memory plan of a training run, from a model's config alone (no torch, no weights).

`plan_memory(config, ...)` gives the bytes one process holds at the peak of a training step:

    weights     P * w                       (w = 2 with --bf16-weights, else 4; FSDP: / n)
    gradients   P_trained * w               (FSDP: / n)
    optimizer   P_trained * s               s: adamw/adam 2w, sgd/adagrad w, 8-bit AdamW 2,
                                            adafactor (rows + cols) * w per matrix, w per vector
    frozen      P_frozen * w                teachers, reference models, the attack's kept
                                            original (forward only, replicated under FSDP)
    activations N * a * (L * A_layer + A_head)   per micro-batch: N = streams * batch * length
                                            tokens, a = 2 in bf16 else 4 bytes, A_layer the
                                            floats autograd keeps per token and decoder layer
                                            (measured per architecture: LAYER_FLOATS), A_head =
                                            3 V + 3 h (logits, their log-softmax, their
                                            gradient). With --gradient-checkpointing only each
                                            layer's input is kept: L * h + A_layer + A_head.

P is counted from the config (`count_parameters`: exact for the architectures `undo init`
offers, a lower bound for others); `check_fits_memory` (the refusal of a model that cannot
load) uses the same count and weight bytes. The total is compared with the memory of the device
the run would use. Checked on a CPU (docs/benchmarks.md, "memory": within 3-7% of measured
peaks); not modelled: FSDP's CPU offload (the first three lines then live in host RAM), QLoRA's
4-bit base, allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Floats autograd saves per token and decoder layer: a_h * hidden + a_i * intermediate +
# a_t * heads * length (attention probabilities where they are materialised). Measured with
# saved-tensor hooks on transformers 5's default (sdpa) attention; see docs/benchmarks.md.
LAYER_FLOATS: dict[str, tuple[float, float, float]] = {
    "llama": (10, 4, 0), "mistral": (10, 4, 0), "qwen2": (10, 4, 0), "phi3": (10, 4, 0),
    "gemma2": (14, 4, 2), "gpt2": (10, 5, 3), "gpt_neox": (10, 2, 0),
}
DEFAULT_LAYER_FLOATS = (10, 4, 1)
GATED = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
         "gemma3_text")
TIED_BY_DEFAULT = ("gpt2", "gemma", "gemma2", "gemma3_text")


def _int(config: dict[str, Any], *keys: str) -> int | None:
    return next((config[k] for k in keys if isinstance(config.get(k), int)
                 and not isinstance(config.get(k), bool)), None)


def declared_layers(config: dict[str, Any]) -> int | None:
    """The decoder layers a config declares."""
    return _int(config, "num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only model that its memory depends on."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inner: int
    positions: int
    tied: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape | None:
        hidden = _int(config, "hidden_size", "n_embd", "d_model")
        layers = declared_layers(config)
        if hidden is None or layers is None:
            return None
        kind = str(config.get("model_type") or "")
        heads = _int(config, "num_attention_heads", "n_head") or 1
        tied = config.get("tie_word_embeddings")
        return cls(model_type=kind, vocab=_int(config, "vocab_size") or 0, hidden=hidden,
                   layers=layers, heads=heads,
                   kv_heads=_int(config, "num_key_value_heads") or heads,
                   head_dim=_int(config, "head_dim") or max(1, hidden // max(1, heads)),
                   inner=_int(config, "intermediate_size", "n_inner") or 4 * hidden,
                   positions=_int(config, "max_position_embeddings", "n_positions") or 0,
                   tied=bool(tied) if isinstance(tied, bool) else kind in TIED_BY_DEFAULT)

    def layer_matrices(self) -> list[tuple[int, int]]:
        """(in, out) of the linear maps of one decoder layer."""
        h, i = self.hidden, self.inner
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = [(h, q), (h, kv), (h, kv), (q, h)]
        if self.model_type in ("gpt2", "gpt_neox"):
            attention = [(h, 3 * h), (h, h)]
        if self.model_type == "phi3":  # fused qkv_proj and gate_up_proj
            return [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]
        mlp = [(h, i), (h, i), (i, h)] if self.model_type in GATED or not self.model_type \
            else [(h, i), (i, h)]
        return attention + mlp

    def layer_vectors(self) -> int:
        """Parameters of one layer outside its matrices: norms and biases."""
        h, i = self.hidden, self.inner
        if self.model_type in ("gpt2", "gpt_neox"):
            return 4 * h + 3 * h + h + i + h  # two LayerNorms (+bias), every bias
        if self.model_type == "qwen2":
            return 2 * h + (self.heads + 2 * self.kv_heads) * self.head_dim  # q,k,v biases
        return (4 if self.model_type.startswith("gemma") else 2) * h

    def layer_parameters(self) -> int:
        return sum(a * b for a, b in self.layer_matrices()) + self.layer_vectors()

    def outside_parameters(self) -> int:
        """Embeddings, the final norm and the head (once if tied)."""
        v, h = self.vocab, self.hidden
        total = v * h + (0 if self.tied else v * h)
        if self.model_type == "gpt2":
            return total + self.positions * h + 2 * h
        return total + (2 * h if self.model_type == "gpt_neox" else h)


def count_parameters(config: dict[str, Any]) -> int | None:
    """Parameters of the model of `config`: exact for llama, mistral, qwen2, phi3, gemma2,
    gpt2 and gpt_neox; a lower bound for other decoder-only models (embeddings once, the
    attention projections and a two-matrix MLP per layer); None without the sizes."""
    shape = Shape.of(config)
    if shape is None:
        return None
    if shape.model_type in LAYER_FLOATS:
        return shape.layers * shape.layer_parameters() + shape.outside_parameters()
    h, q = shape.hidden, shape.heads * shape.head_dim
    attention = 2 * h * q + 2 * h * shape.kv_heads * shape.head_dim
    return shape.vocab * h + shape.layers * (attention + 2 * h * shape.inner)


def weight_bytes(config: dict[str, Any], bytes_per_parameter: int) -> tuple[int, int] | None:
    """(parameters, bytes) of the weights of `config`'s model, or None if unknown."""
    params = count_parameters(config)
    return None if params is None else (params, params * bytes_per_parameter)


def lora_parameters(config: dict[str, Any], rank: int, layers: int | None = None) -> int:
    """Adapter parameters of LoRA rank `rank` on every linear map of `layers` decoder layers
    (all by default): rank * (in + out) per matrix."""
    shape = Shape.of(config)
    if shape is None:
        return 0
    n = shape.layers if layers is None else layers
    return n * rank * sum(a + b for a, b in shape.layer_matrices())


def _optimizer_bytes(optimizer: str, shape: Shape | None, trained: int, trained_layers: int,
                     w: int, lora_rank: int | None) -> int:
    if optimizer in ("adamw", "adam"):
        return 2 * w * trained
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        return 2 * trained
    if optimizer == "adafactor" and shape is not None:
        if lora_rank:  # factored moments of the adapter matrices
            per = sum((lora_rank + a) + (lora_rank + b) for a, b in shape.layer_matrices())
            return w * trained_layers * per
        per_layer = sum(a + b for a, b in shape.layer_matrices()) + shape.layer_vectors()
        return w * min(trained, trained_layers * per_layer + 2 * shape.vocab)
    return w * trained  # sgd (momentum), adagrad (sum of squares)


def format_bytes(n: int | float) -> str:
    """12345678 -> "12.3 MB" (decimal units, 3 significant digits)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryPlan:
    """Bytes one process needs at the peak of a step (module docstring), and whether they fit."""

    parameters: int
    trainable: int
    frozen: int
    weights: int
    gradients: int
    optimizer_state: int
    frozen_weights: int
    activations: int
    tokens_per_micro_batch: int
    processes: int
    sharded: bool
    device: str
    available: int | None

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer_state + self.frozen_weights
                + self.activations)

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "fits": self.fits}

    def lines(self) -> list[str]:
        """The plan as people read it."""
        gb = format_bytes
        per = f" per process ({self.processes} processes, FSDP-sharded)" if self.sharded else (
            f" per process ({self.processes} processes)" if self.processes > 1 else "")
        verdict = ("unknown (device memory not measured)" if self.fits is None else
                   f"{'fits' if self.fits else 'does NOT fit'} in the {gb(self.available)} "
                   f"available on {self.device}")
        return [f"parameters        {self.parameters:,} ({self.trainable:,} trained"
                + (f", {self.frozen:,} in frozen models)" if self.frozen else ")"),
                f"weights           {gb(self.weights)}",
                f"gradients         {gb(self.gradients)}",
                f"optimizer state   {gb(self.optimizer_state)}",
                *([f"frozen models     {gb(self.frozen_weights)}"] if self.frozen else []),
                f"activations       {gb(self.activations)} per micro-batch of "
                f"{self.tokens_per_micro_batch:,} tokens",
                f"total             {gb(self.total)}{per}: {verdict}"]


def plan_memory(config: dict[str, Any], *, batch_size: int, length: int, streams: int = 1,
                optimizer: str = "adamw", bf16: bool = False, bf16_weights: bool = False,
                gradient_checkpointing: bool = False, trained_layers: int | None = None,
                trainable: int | None = None, lora_rank: int | None = None,
                frozen_parameters: int = 0, processes: int = 1, sharded: bool = False,
                device: str = "cpu", available: int | None = None) -> MemoryPlan | None:
    """The plan of training `config`'s model (module docstring); None if the config does not
    give its sizes. `trained_layers`: only that many decoder layers train (--train-layers);
    `trainable`: an exact count of trained parameters instead (e.g. --trainable REGEX);
    `lora_rank`: a LoRA adapter on every linear map trains instead of the model."""
    shape = Shape.of(config)
    params = count_parameters(config)
    if shape is None or params is None:
        return None
    w = 2 if bf16_weights else 4
    a = 2 if bf16_weights or (bf16 and device.startswith("cuda")) else 4
    n_layers = shape.layers if trained_layers is None else trained_layers
    if lora_rank:
        trained = lora_parameters(config, lora_rank, trained_layers)
    elif trainable is not None:
        trained = trainable
    elif trained_layers is not None:
        trained = trained_layers * shape.layer_parameters()
    else:
        trained = params
    share = processes if sharded else 1
    tokens = streams * batch_size * length
    a_h, a_i, a_t = LAYER_FLOATS.get(shape.model_type, DEFAULT_LAYER_FLOATS)
    layer = a_h * shape.hidden + a_i * shape.inner + a_t * shape.heads * length
    head = 3 * shape.vocab + 3 * shape.hidden
    floats = (shape.layers * shape.hidden + layer if gradient_checkpointing
              else shape.layers * layer) + head
    total_params = params + (lora_parameters(config, lora_rank, trained_layers)
                             if lora_rank else 0)
    return MemoryPlan(
        parameters=total_params, trainable=trained, frozen=frozen_parameters,
        weights=total_params * w // share, gradients=trained * w // share,
        optimizer_state=_optimizer_bytes(optimizer, shape, trained, n_layers, w,
                                         lora_rank) // share,
        frozen_weights=frozen_parameters * w, activations=int(tokens * a * floats),
        tokens_per_micro_batch=tokens, processes=processes, sharded=sharded, device=device,
        available=available)
