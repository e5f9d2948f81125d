"""Unlearning methods registered by name, and `unlearn_checkpoint` (the library of `undo unlearn`).

A method is one function `fn(model, batches, ctx) -> (loss, terms)` decorated with
`@register_method(NAME, formula=...)`: `batches` holds the micro-batches of the step
(`"forget"` always, `"retain"` when retain data was given), `ctx` is the `UnlearnContext`
(options, frozen reference model, steering vector, cached forwards) and `loss` is the scalar
the engine minimises. Adding a method is one function plus its decorator line.

Modifiers usable with every method:

- RepNoise (`options.repnoise`): adds beta * MMD(forget activations, N(0, I)) -
  alpha * log(1 + CE(forget)) (see `losses.repnoise_loss`).
- SAM (`--sam RHO`): sharpness-aware minimisation is done by the training engine
  (`TrainConfig.sam_rho`): the gradient is taken at the adversarially perturbed weights.

Defaults follow the papers where they give them (RMU: steering coefficient 6.5, retain
weight 1200, trained parameters the MLP down-projections of layers L-2..L; NPO: beta 0.1;
RepNoise: alpha 1, beta 0.001; retain weight 1 elsewhere) and keep working on tiny models.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from undo_cli import losses, stage
from undo_cli.checkpoint import load_model, save_layout
from undo_cli.data import build_stream, model_inputs
from undo_cli.errors import UsageError
from undo_cli.options import (
    DataOptions,
    EvalOptions,
    LoadOptions,
    SaveOptions,
    TrainConfig,
    UnlearnOptions,
    rates,
)
from undo_cli.options.defaults import RMU_STEPS, UNLEARN, UNLEARN_STEPS
from undo_cli.options.rates import RMU_TINY_LR, UNLEARN_LR, UNLEARN_TINY_LR

Batch = dict[str, torch.Tensor]
MethodFn = Callable[[torch.nn.Module, dict[str, Batch], "UnlearnContext"],
                    tuple[torch.Tensor, dict[str, float]]]

# RMU's layer of the WMDP paper (Li et al. 2024): layer 7 of Zephyr-7B. Smaller models use
# a layer a little below their middle (see `default_rmu_layer`).
RMU_PAPER_LAYER = 7


@dataclass(frozen=True)
class Method:
    """A registered unlearning method."""

    name: str
    fn: MethodFn
    formula: str
    retain_weight: float = 1.0  # default of --retain-weight
    uses_retain: bool = True  # False: the method has no retain term (giving retain data is refused)
    # The stream ("forget" or "retain") on which a frozen copy of the input model runs, if
    # any; the copy is made only when that stream is given.
    reference_stream: str | None = None
    steered: bool = False  # uses a layer (--layer) and a steering vector c * u (RMU)
    lr: float = UNLEARN_LR  # default learning rate for models of TINY_MODEL_PARAMS or more
    tiny_lr: float = UNLEARN_TINY_LR  # ... and for smaller ones (`options.rates.default_lr`)
    max_steps: int = UNLEARN_STEPS  # default budget
    default_trainable: Callable[[torch.nn.Module, UnlearnOptions], str] | None = None


METHODS: dict[str, Method] = {}


def register_method(name: str, *, formula: str,
                    **attributes: Any) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register `fn` as the unlearning method `name` (formula shown in --help)."""

    def decorate(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise ValueError(f"unlearning method {name!r} registered twice")
        METHODS[name] = Method(name=name, fn=fn, formula=formula, **attributes)
        return fn

    return decorate


def get_method(name: str) -> Method:
    """The method registered as `name`; `UsageError` naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown unlearning method {name!r}; choose one of "
                         f"{', '.join(sorted(METHODS))}") from None


@dataclass
class UnlearnContext:
    """What a method needs besides the model and the batches."""

    options: UnlearnOptions
    retain_weight: float
    reference: torch.nn.Module | None = None  # frozen copy of the input model
    layer: int | None = None  # RMU's decoder layer (0-based)
    steering: torch.Tensor | None = None  # RMU's c * u, shape [hidden]
    hidden_streams: frozenset[str] = frozenset()  # streams whose forward returns hidden states
    reference_cache_size: int = 1  # frozen results kept (SAM re-uses them; = grad_accum)
    _outputs: dict[str, Any] = field(default_factory=dict)
    _reference: OrderedDict = field(default_factory=OrderedDict)

    def forward(self, model: torch.nn.Module, name: str, batch: Batch):
        """The model's output on stream `name`'s batch, computed once per loss evaluation."""
        if name not in self._outputs:
            self._outputs[name] = model(**model_inputs(batch),
                                        output_hidden_states=name in self.hidden_streams)
        return self._outputs[name]

    def reference_value(self, key: str, batch: Batch,
                        compute: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """`compute(reference output)` on `batch`, without gradient, cached per batch.

        The engine calls the loss twice on the same batches under SAM; the frozen model's
        result is the same both times, so it is computed once (the cache holds the last
        `reference_cache_size` batches and checks the batch's identity, not just its id).
        """
        if self.reference is None:  # pragma: no cover - guarded by the method's attributes
            raise RuntimeError("this method needs a reference model")
        ids = batch["input_ids"]
        slot = (key, id(ids))
        hit = self._reference.get(slot)
        if hit is not None and hit[0] is ids:
            return hit[1]
        ref = self.reference
        if next(ref.parameters()).device != ids.device:
            ref.to(ids.device)
        with torch.no_grad():
            out = ref(**model_inputs(batch), output_hidden_states=self.steering is not None)
            value = compute(out).detach()
        self._reference[slot] = (ids, value)
        while len(self._reference) > max(1, self.reference_cache_size):
            self._reference.popitem(last=False)
        return value

    def steering_on(self, device: torch.device) -> torch.Tensor:
        if self.steering.device != device:
            self.steering = self.steering.to(device)
        return self.steering

    def clear(self) -> None:
        """Drop the trained model's outputs (called around every loss evaluation)."""
        self._outputs.clear()


def _forget_ce_for_logs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return losses.token_cross_entropy(logits, batch["labels"], batch.get("num_targets"))


def _retain_ce(model, batches, ctx: UnlearnContext, terms: dict[str, float]) -> torch.Tensor:
    """ctx.retain_weight * CE(retain), or 0 without retain data."""
    batch = batches.get("retain")
    if batch is None:
        return torch.zeros((), device=batches["forget"]["input_ids"].device)
    ce = losses.token_cross_entropy(ctx.forward(model, "retain", batch).logits, batch["labels"],
                                    batch.get("num_targets"))
    terms["retain_ce"] = ce.detach()
    return ctx.retain_weight * ce


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


@register_method("maxent", formula="KL(Uniform || p) on forget tokens + a * CE(retain)")
def maxent(model, batches, ctx):
    """MaxEnt: L = (1/N) sum_t KL(U || p_theta(. | x_<=t)) over forget tokens + a * CE(retain).

    Pushes the next-token distribution on forget text toward uniform (the paper's
    recommended teacher for UNDO); a = --retain-weight (default 1).
    """
    batch = batches["forget"]
    logits = ctx.forward(model, "forget", batch).logits
    kl = losses.maxent_kl(logits, batch["labels"], batch.get("num_targets"))
    terms = {"forget_kl": kl.detach(), "forget_ce": _forget_ce_for_logs(logits, batch)}
    return kl + _retain_ce(model, batches, ctx, terms), terms


@register_method("graddiff", formula="-CE(forget) + a * CE(retain)")
def graddiff(model, batches, ctx):
    """Gradient difference: L = -CE(forget) + a * CE(retain), a = --retain-weight (default 1)."""
    batch = batches["forget"]
    ce = losses.token_cross_entropy(ctx.forward(model, "forget", batch).logits, batch["labels"],
                                    batch.get("num_targets"))
    terms = {"forget_ce": ce.detach()}
    return -ce + _retain_ce(model, batches, ctx, terms), terms


@register_method("ga", formula="-CE(forget) (gradient ascent; no retain term)",
                 uses_retain=False)
def gradient_ascent(model, batches, ctx):
    """Gradient ascent: L = -CE(forget). Unbounded: limit it with --max-steps."""
    batch = batches["forget"]
    ce = losses.token_cross_entropy(ctx.forward(model, "forget", batch).logits, batch["labels"],
                                    batch.get("num_targets"))
    return -ce, {"forget_ce": ce.detach()}


@register_method("npo", formula="-(2/b) log sigmoid(-b (log p(y|x) - log p_ref(y|x))) on forget "
                 "sequences + a * CE(retain)", reference_stream="forget")
def npo(model, batches, ctx):
    """NPO: L = mean_seq -(2/b) log sigmoid(-b (log p_theta(y|x) - log p_ref(y|x))) + a CE(retain).

    p_ref is the frozen input model, b = --beta (default 0.1, as in the NPO paper), a =
    --retain-weight (default 1). A sequence is a document (packed documents are scored one by
    one); sequences without forget tokens are skipped. The mean is over the micro-batch's
    sequences.
    """
    batch = batches["forget"]
    labels, positions = batch["labels"], batch.get("position_ids")
    logits = ctx.forward(model, "forget", batch).logits
    logp = losses.sequence_log_prob(logits, labels, positions)
    ref_logp = ctx.reference_value(
        "forget", batch, lambda out: losses.sequence_log_prob(out.logits, labels, positions))
    valid = losses.sequence_has_targets(labels, positions)
    loss = losses.npo_loss(logp, ref_logp, ctx.options.beta, valid)
    terms = {"forget_npo": loss.detach(), "forget_ce": _forget_ce_for_logs(logits, batch)}
    return loss + _retain_ce(model, batches, ctx, terms), terms


def _steered_layer(model: torch.nn.Module, options: UnlearnOptions) -> int:
    """RMU's layer (--layer, or the default for the model), checked against the model."""
    n = num_layers(model)
    layer = options.layer if options.layer is not None else default_rmu_layer(model)
    if layer >= n:
        raise UsageError(f"--layer {layer}: the model has {n} layers (0..{n - 1})")
    return layer


def _hidden_at(output, layer: int) -> torch.Tensor:
    # hidden_states[0] is the embedding output; hidden_states[i + 1] the output of layer i.
    return output.hidden_states[layer + 1]


def _rmu_trainable(model: torch.nn.Module, options: UnlearnOptions) -> str:
    layer = options.layer if options.layer is not None else default_rmu_layer(model)
    layers = "|".join(str(i) for i in range(max(0, layer - 2), layer + 1))
    # Llama / Gemma / Qwen / Mistral / Phi-3 name it mlp.down_proj, GPT-2 mlp.c_proj,
    # GPT-NeoX mlp.dense_4h_to_h.
    return rf"(^|\.)(layers|h)\.({layers})\.mlp\.(down_proj|c_proj|dense_4h_to_h)\.weight$"


@register_method("rmu", formula="MSE(h_L(forget), c*u) + a * MSE(h_L(retain), h_L^frozen(retain))",
                 retain_weight=1200.0, reference_stream="retain", steered=True,
                 tiny_lr=RMU_TINY_LR, max_steps=RMU_STEPS,
                 default_trainable=_rmu_trainable)
def rmu(model, batches, ctx):
    """RMU: L = MSE(h_L(forget), c*u) + a * MSE(h_L(retain), h_L^frozen(retain)).

    h_L is the output of decoder layer L = --layer (0-based; default `default_rmu_layer`),
    u a fixed random unit vector seeded by --seed, c = --steering-coeff (default 6.5), a =
    --retain-weight (default 1200); MSE is the mean over hidden units and over forget tokens
    (labels kept) resp. retain tokens (attention mask). Only the MLP down-projections of
    layers L-2..L are trained unless --trainable says otherwise (WMDP paper, Li et al. 2024).
    """
    batch = batches["forget"]
    hidden = _hidden_at(ctx.forward(model, "forget", batch), ctx.layer)
    forget_mask = batch["labels"] != losses.IGNORE_INDEX
    loss = losses.masked_mse(hidden, ctx.steering_on(hidden.device), forget_mask)
    terms = {"forget_mse": loss.detach()}
    retain = batches.get("retain")
    if retain is not None:
        new = _hidden_at(ctx.forward(model, "retain", retain), ctx.layer)
        old = ctx.reference_value("retain", retain, lambda out: _hidden_at(out, ctx.layer))
        mask = retain.get("attention_mask")
        kept = mask.bool() if mask is not None else None
        retain_mse = losses.masked_mse(new, old, kept)
        terms["retain_mse"] = retain_mse.detach()
        loss = loss + ctx.retain_weight * retain_mse
    return loss, terms


def _repnoise_term(model, batches, ctx: UnlearnContext, terms: dict[str, float]) -> torch.Tensor:
    batch = batches["forget"]
    out = ctx.forward(model, "forget", batch)
    labels = batch["labels"]
    ce = losses.token_cross_entropy(out.logits, labels)
    # Noise the output of every decoder layer (hidden_states[1:]) at the forget tokens.
    term = losses.repnoise_loss(out.hidden_states[1:], labels != losses.IGNORE_INDEX, ce,
                                alpha=ctx.options.repnoise_alpha, beta=ctx.options.repnoise_beta)
    terms["repnoise"] = term.detach()
    return term


def make_loss_fn(method: Method, ctx: UnlearnContext):
    """The engine's `loss_fn(model, batches) -> (loss, terms)` for `method` (+ RepNoise)."""

    def loss_fn(model, batches):
        ctx.clear()
        try:
            loss, terms = method.fn(model, batches, ctx)
            if ctx.options.repnoise:
                loss = loss + _repnoise_term(model, batches, ctx, terms)
        finally:
            ctx.clear()  # never hold activations between steps
        return loss, terms

    return loss_fn


# --------------------------------------------------------------------------------------------
# Setting a method up on a model
# --------------------------------------------------------------------------------------------


def num_layers(model: torch.nn.Module) -> int:
    config = model.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise UsageError("cannot tell how many layers the model has (no num_hidden_layers in its "
                     "config); pass --layer")


def default_rmu_layer(model: torch.nn.Module) -> int:
    """min(7, n_layers // 2 - 1), at least 0: layer 7 as in the WMDP paper for deep models,
    a layer just below the middle for small ones (2 layers -> 0, 6 -> 2, 12 -> 5)."""
    return max(0, min(RMU_PAPER_LAYER, num_layers(model) // 2 - 1))


def steering_vector(hidden_size: int, coeff: float, seed: int) -> torch.Tensor:
    """c * u with u a random unit vector (standard normal, normalised) drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(hidden_size, generator=g, dtype=torch.float32)
    return coeff * u / u.norm()


def select_parameters(model: torch.nn.Module, pattern: str | None
                      ) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs whose name matches `pattern` (re.search); all when None."""
    return stage.select_parameters(model, pattern, pattern_flag="--trainable")


def frozen_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` in eval mode (the reference / original model)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@dataclass
class MethodSetup:
    """Everything `train()` needs from a method, built by `prepare_method`."""

    method: Method
    context: UnlearnContext
    loss_fn: Callable
    parameters: list[torch.nn.Parameter]
    trainable_names: list[str]
    trainable_pattern: str | None
    reference_parameters: int  # parameters of the frozen copy (0 without one)

    def frozen_forward_params(self, streams: dict[str, Any]) -> int:
        """The engine's `frozen_forward_params`: it charges 2 * P * (all tokens of a step) for
        frozen forwards, but the reference only runs on one stream, so P is scaled by that
        stream's share of the tokens."""
        name = self.method.reference_stream
        if not self.reference_parameters or name not in streams:
            return 0
        try:
            sizes = {k: float(s.tokens_per_batch()) for k, s in streams.items()}
        except AttributeError:
            return self.reference_parameters
        total = sum(sizes.values())
        return round(self.reference_parameters * sizes[name] / total) if total else 0


def check_retain(method: Method, *, has_retain: bool) -> None:
    """Refuse retain data for a method without a retain term, before anything is loaded.
    (The options' own values were checked when the `UnlearnOptions` was built.)"""
    if has_retain and not method.uses_retain:
        raise UsageError(f"method {method.name!r} has no retain term; drop --retain or use "
                         "'graddiff' (gradient ascent + retain)")


def prepare_method(model: torch.nn.Module, method: str | Method, options: UnlearnOptions, *,
                   has_retain: bool, grad_accum: int = 1) -> MethodSetup:
    """Build the context, loss function and trainable parameters of `method` on `model`.

    The frozen reference copy, when the method needs one, is taken here, so call this before
    training. The model's parameters are not touched: pass `setup.parameters` to `train`.
    """
    method = get_method(method) if isinstance(method, str) else method
    check_retain(method, has_retain=has_retain)
    weight = options.retain_weight if options.retain_weight is not None else method.retain_weight
    hidden = {"forget"} if options.repnoise else set()
    layer = None
    steering = None
    if method.steered:
        layer = _steered_layer(model, options)
        hidden |= {"forget", "retain"}
        steering = steering_vector(model.config.hidden_size, options.steering_coeff, options.seed)
    reference = None
    if method.reference_stream == "forget" or (method.reference_stream == "retain"
                                               and has_retain):
        reference = frozen_reference(model)
    pattern = options.trainable
    if pattern is None and method.default_trainable is not None:
        pattern = method.default_trainable(model, options)
    chosen = select_parameters(model, pattern)
    ctx = UnlearnContext(options=options, retain_weight=weight, reference=reference,
                         layer=layer, steering=steering, hidden_streams=frozenset(hidden),
                         reference_cache_size=grad_accum)
    ref_params = 0
    if reference is not None:
        ref_params = sum(p.numel() for p in {id(p): p for p in reference.parameters()}.values())
    return MethodSetup(method=method, context=ctx, loss_fn=make_loss_fn(method, ctx),
                       parameters=[p for _, p in chosen], trainable_names=[n for n, _ in chosen],
                       trainable_pattern=pattern, reference_parameters=ref_params)


def default_lr(method: Method, parameters: int) -> float:
    """The method's learning rate for a model of `parameters` parameters, as
    `undo_cli.options.rates.default_lr` decides it: UNLEARN_LR (the middle of the UNDO
    paper's 1e-5..8e-5 sweep on its 100M-parameter models) from TINY_MODEL_PARAMS parameters
    up; below, toy models need more: UNLEARN_TINY_LR (RMU, which trains only a few matrices:
    RMU_TINY_LR)."""
    return rates.default_lr("unlearn", parameters=parameters, lr=method.lr,
                            tiny_lr=method.tiny_lr)


# --------------------------------------------------------------------------------------------
# The library entry point of `undo unlearn`
# --------------------------------------------------------------------------------------------



def plan_unlearn(
    src: str | Path,
    dst: str | Path,
    method: str,
    forget_specs: Sequence[str],
    retain_specs: Sequence[str] = (),
    options: UnlearnOptions = UnlearnOptions(),
    train_config: TrainConfig = UNLEARN,
    *,
    data_options: DataOptions = DataOptions(),
    evals: EvalOptions = EvalOptions(),
    load: LoadOptions = LoadOptions(),
    overwrite: bool = False,
    keep_state: bool = False,
    save: SaveOptions = SaveOptions(),
) -> stage.StagePlan:
    """The plan of `unlearn_checkpoint`, decided on the input's config before any weight
    loads: the method's budget, the learning rate by the model's size (counted on its meta
    model), RMU's layer, the trained parameters, the retain weight and the memory plan."""
    started = time.time()
    chosen = get_method(method)
    forget_specs, retain_specs = list(forget_specs), list(retain_specs)
    if not forget_specs:
        raise UsageError("no forget data: give --forget FILE")
    has_retain = bool(retain_specs)
    options = replace(options, seed=train_config.seed)
    check_retain(chosen, has_retain=has_retain)
    if (train_config.max_steps is None and train_config.max_tokens is None
            and train_config.max_flops is None):
        train_config = replace(train_config, max_steps=chosen.max_steps)
    config, infos, data_options = stage.check_stage(
        dst, [src], train_config, data_options, load, overwrite=overwrite,
        reads=[*stage.data_paths("--forget", forget_specs),
               *stage.data_paths("--retain", retain_specs), *stage.eval_paths(evals)],
        lr_decided_later=True)
    model_config = infos[0].config
    meta = stage.meta_model(model_config)
    decided = options  # with RMU's layer and the trained parameters decided on the model
    if meta is not None:  # else (custom code) `prepare_method` decides them on the model
        layer = _steered_layer(meta, options) if chosen.steered else options.layer
        trainable = options.trainable
        if trainable is None and chosen.default_trainable is not None:
            trainable = chosen.default_trainable(meta, options)
        decided = replace(options, layer=layer, trainable=trainable)
        select_parameters(meta, decided.trainable)  # a selection matching nothing fails now
    if config.lr is None:
        parameters = stage.model_parameters(model_config, meta)
        if parameters is None:
            raise UsageError("the model's config does not give its size, from which the "
                             "learning rate is chosen: give --lr")
        config = replace(config, lr=default_lr(chosen, parameters))
    weight = options.retain_weight if options.retain_weight is not None else chosen.retain_weight
    reference = chosen.reference_stream == "forget" or (chosen.reference_stream == "retain"
                                                        and has_retain)
    memory = stage.memory_plan(
        model_config, config, length=data_options.max_length, streams=2 if has_retain else 1,
        trainable=None if meta is None else sum(
            p.numel() for _, p in select_parameters(meta, decided.trainable)),
        frozen_parameters=(stage.model_parameters(model_config, meta) or 0) if reference else 0)
    arguments = stage.arguments(
        config, data_options, evals, method=chosen.name, formula=chosen.formula,
        forget=forget_specs, retain=retain_specs, options=options.as_dict(),
        retain_weight=weight, layer=decided.layer if chosen.steered else None,
        trainable=None if decided.trainable is None else str(decided.trainable))
    return stage.StagePlan(
        "unlearn", Path(dst), (src,), tuple(infos), config, data_options, evals, load,
        memory=memory, arguments=arguments, parents=stage.with_bases({"input": src}, infos),
        layout=save_layout(save, infos[0]), source=src, overwrite=overwrite,
        keep_state=keep_state, started=started)


def unlearn_checkpoint(src: str | Path, dst: str | Path, method: str,
                       forget_specs: Sequence[str], retain_specs: Sequence[str] = (),
                       options: UnlearnOptions = UnlearnOptions(),
                       train_config: TrainConfig = UNLEARN, *,
                       callbacks: stage.Callbacks | None = None, **settings: Any
                       ) -> dict[str, Any]:
    """Unlearn `forget_specs` from checkpoint `src` with `method`; write the result to `dst`.

    `train_config.lr = None` picks `default_lr` for the model's size; no budget (max steps,
    tokens or FLOPs) means the method's `max_steps`; no `train_config` means both, with a
    constant learning rate (the paper's).

    `forget_specs` / `retain_specs` are `PATH[:WEIGHT]` data specs (`undo_cli.data`); the
    `evals` sets are evaluated every `eval_every` steps and at the end (metrics `name.loss`,
    ...). `dst` gets the model, tokenizer, `undo.json` and `train_log.jsonl`, atomically: a
    failed or diverged run leaves nothing. The training state in `train_config.state_dir`
    (for `--resume`) is deleted once the output is written, unless `keep_state`. Returns a
    summary (also recorded in the manifest). The model is written in `src`'s dtype and
    sharding unless `save` says otherwise. `settings` are `plan_unlearn`'s keywords
    (`data_options`, `evals`, `load`, `overwrite`, `keep_state`, `save`).
    """
    plan = plan_unlearn(src, dst, method, forget_specs, retain_specs, options, train_config,
                        **settings)
    load = plan.load
    config, args = plan.config, plan.arguments
    chosen = get_method(method)
    options = replace(options, seed=config.seed, layer=args["layer"],
                      trainable=args["trainable"])

    def tokenizer():
        return stage.tokenizer_of(src, load)

    def prepare(tok, sets) -> stage.Job:  # noqa: ARG001 - the runner measures the sets
        streams = {name: build_stream(tok, specs, plan.data_options.max_length,
                                      config.batch_size, config.seed, name=name,
                                      packing=plan.data_options.packing)
                   for name, specs in (("forget", args["forget"]), ("retain", args["retain"]))
                   if specs}
        model = load_model(src, allow_pickle=load.allow_pickle,
                           trust_remote_code=load.trust_remote_code, base_model=load.base_model)
        setup = prepare_method(model, chosen, options, has_retain=bool(args["retain"]),
                               grad_accum=config.grad_accum)
        return stage.Job(
            model, setup.loss_fn, streams, parameters=setup.parameters,
            frozen_forward_params=setup.frozen_forward_params(streams),
            extra={"unlearn": {"trainable_parameters": setup.trainable_names[:50],
                               "trainable_count": len(setup.trainable_names)}},
            summary=lambda written: {"method": chosen.name, "lr": config.lr})

    return stage.run_stage(plan, tokenizer, prepare, callbacks=callbacks)
