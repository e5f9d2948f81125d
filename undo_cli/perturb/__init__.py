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

Modules: `noise.py` (options and the arithmetic, numpy), `stream.py` (`perturb_checkpoint`),
`memory.py` (tensors in memory), `float8.py` (the one torch-dependent conversion).

Tied weights (e.g. GPT-2's `lm_head.weight` and `transformer.wte.weight`) are noised once,
keyed by the input embedding's name; a checkpoint that stores both gets identical outputs.
"""

from undo_cli.perturb.memory import (
    noise_selection,
    perturb_model_,
    perturb_state_dict,
    perturb_tensor,
)
from undo_cli.perturb.noise import (
    CHUNK_ELEMENTS,
    INPUT_EMBEDDINGS,
    OUTPUT_EMBEDDINGS,
    RECOMMENDED_ALPHA,
    RECOMMENDED_BETA,
    PerturbOptions,
    chunk_generator,
    draw_noise,
    fan_in_and_fan_out,
    noise_scale,
    resolve_noise,
    tensor_action,
    tied_embeddings,
)
from undo_cli.perturb.stream import PerturbPlan, perturb_checkpoint, plan_perturbation

__all__ = [
    "CHUNK_ELEMENTS", "INPUT_EMBEDDINGS", "OUTPUT_EMBEDDINGS", "RECOMMENDED_ALPHA",
    "RECOMMENDED_BETA", "PerturbOptions", "PerturbPlan", "chunk_generator", "draw_noise",
    "fan_in_and_fan_out", "noise_scale", "noise_selection", "perturb_checkpoint",
    "perturb_model_", "perturb_state_dict", "perturb_tensor", "plan_perturbation", "resolve_noise",
    "tensor_action", "tied_embeddings",
]
