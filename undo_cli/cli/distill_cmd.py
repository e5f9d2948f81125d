"""`undo distill`: forward-KL distillation into a noised copy or a fresh init."""

from __future__ import annotations

from pathlib import Path

import typer

from undo_cli.cli import app
from undo_cli.cli.common import TrainingOptions, emit_json, info, training_options

DEFAULT_STEPS = 1000


@app.command("distill")
@training_options(
    defaults={"lr": 1e-3, "max_steps": None},
    help={"max_steps": f"Stop after this many optimizer steps. Default: {DEFAULT_STEPS} unless "
                       "--max-tokens, --max-flops or --stop-when is given.",
          "lr": "Peak learning rate (AdamW). Default 1e-3 suits tiny models trained from a "
                "noised init; use ~1e-4 or lower for large models."},
)
def distill_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    teacher: Path = typer.Option(..., "--teacher", metavar="CKPT",
                                 help="The (unlearned) teacher checkpoint."),
    student: str = typer.Option(
        "", "--student", metavar="CKPT|random|teacher",
        help="The student's initial weights: a checkpoint (normally `undo perturb` of the "
        "teacher), `random` (fresh init with the teacher's config: Unlearn-and-Distill), or "
        "`teacher` with --alpha/--beta (noised in memory, identical to `undo perturb`)."),
    data: list[str] = typer.Option(
        ..., "--data", metavar="PATH[:WEIGHT]",
        help="Distillation data (retain / pretraining-like text), repeatable with weights."),
    eval_sets: list[str] = typer.Option(
        [], "--eval", metavar="NAME=PATH",
        help="Sets measured on the teacher once and on the student every --eval-every steps "
        "(metrics NAME.loss, NAME.accuracy, ...); used by --stop-when."),
    alpha: float = typer.Option(
        None, help="Noise the teacher in memory: (1-alpha)*w + alpha*beta*N (paper: 0.6)."),
    beta: float = typer.Option(None, help="Noise scale with --alpha (paper: 0.1)."),
    noise: str = typer.Option("xavier-uniform", help="xavier-uniform or xavier-normal."),
    perturb_seed: int = typer.Option(0, help="Seed of the in-memory noise (as undo perturb "
                                     "--seed)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature of both models; the loss "
                                      "is T^2 * KL."),
    ce_weight: float = typer.Option(0.0, help="Weight of the hard-label CE mixed into the loss "
                                    "(paper: 0)."),
    kd_chunk_size: int = typer.Option(
        1024, help="Positions per chunk of the KL computation: bounds peak memory with large "
        "vocabularies (the result is the same for any value)."),
    max_flops: float = typer.Option(None, help="Stop once student + teacher FLOPs reach this."),
    stop_when: str = typer.Option(
        None, metavar="EXPR",
        help="Stop at the first evaluation where EXPR holds, comparing student metrics with "
        "the teacher's, e.g. \"retain.accuracy >= teacher - 0.05\" or \"retain.loss <= teacher "
        "* 1.05\" (teacher = the teacher's value of the same metric; or teacher.SET.METRIC)."),
    cache_teacher: Path = typer.Option(
        None, metavar="DIR",
        help="Store the teacher's top-k outputs for the data stream in DIR (or read them "
        "back), so an alpha sweep runs the teacher once."),
    cache_topk: int = typer.Option(
        64, help="Teacher log-probabilities kept per position in the cache; the rest is one "
        "bucket (exact when k >= vocabulary size)."),
    eval_batch_size: int = typer.Option(None, help="Batch size of evaluation (default: "
                                        "automatic)."),
    max_new_tokens: int = typer.Option(16, help="Greedy tokens generated per prompt when "
                                       "measuring accuracy."),
    *,
    opts: TrainingOptions,
) -> None:
    """Distil a teacher into a noised copy or a fresh init (forward KL on outputs).

    The loss is KL(teacher || student) over next-token distributions on every trained
    position, the teacher frozen in eval mode. OUT gets the student, train_log.jsonl and
    undo.json (student and teacher FLOPs, steps, tokens, stop reason, final metrics).
    """
    from dataclasses import asdict

    from undo_cli.distill import DistillSettings, distill_checkpoint
    from undo_cli.records import parse_named_spec

    settings = DistillSettings(
        temperature=temperature, ce_weight=ce_weight, chunk_size=kd_chunk_size, alpha=alpha,
        beta=beta, noise=noise, perturb_seed=perturb_seed, stop_when=stop_when,
        cache_dir=cache_teacher, cache_topk=cache_topk, eval_batch_size=eval_batch_size,
        max_new_tokens=max_new_tokens)
    if noise not in ("xavier-uniform", "xavier-normal"):
        from undo_cli.errors import UsageError

        raise UsageError(f"--noise must be xavier-uniform or xavier-normal (got {noise!r})")
    max_steps = opts.max_steps
    if max_steps is None and opts.max_tokens is None and max_flops is None and not stop_when:
        max_steps = DEFAULT_STEPS
    if max_steps is None and opts.max_tokens is None and max_flops is None:
        max_steps = 100 * DEFAULT_STEPS  # --stop-when alone: a generous safety cap
    config = opts.train_config(out, max_steps=max_steps, max_flops=max_flops)
    if stop_when and config.eval_every is None:
        config.eval_every = 50
    evals = [parse_named_spec(spec, "--eval") for spec in eval_sets]
    arguments = {"teacher": teacher, "student": student or ("teacher" if alpha is not None
                                                            else ""),
                 "data": list(data), "eval": [list(e) for e in evals],
                 "max_length": opts.max_length,
                 "train": {k: v for k, v in asdict(config).items()
                           if k not in ("log_path", "quiet", "state_dir", "resume", "device")}}
    summary = distill_checkpoint(
        teacher, student or ("teacher" if alpha is not None else ""), out, data=list(data),
        evals=evals, config=config, max_length=opts.max_length, settings=settings,
        overwrite=opts.overwrite, allow_pickle=opts.allow_pickle,
        trust_remote_code=opts.trust_remote_code, arguments=arguments)
    if not summary.pop("is_main_process"):
        return
    if opts.json:
        emit_json(summary)
    else:
        kd = summary["kd_loss"]
        info(f"wrote {out}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
             f"kd_loss {kd:.4g}, stopped by {summary['stop_reason']}" if kd is not None else
             f"wrote {out}: {summary['steps']} steps, stopped by {summary['stop_reason']}")
