"""`--search N`: an Optuna study over the attack's space instead of the full grid.

The TamperBench way of finding the strongest finetuning attack: a TPE sampler (seeded by the
attack's `--seed`, so a search is repeatable) proposes N runs over the space the grid flags
define (optimizer, schedule, batch size, learning rate log-uniform over the optimizer's grid
range, LoRA or full finetuning and LoRA rank), each scored by the forget metric at its last
step; a median pruner stops a run early once its curve trails the earlier runs' at the same
step. Every trial is an ordinary run of results.json (`"trial"`: its number; `"pruned"`), so
the worst case counts it like a grid run. With `--search-storage` the study (and each trial's
run, kept as a trial attribute) lives in an Optuna storage, and an interrupted search resumes:
the study is named after everything that defines the attack (`study_name`), so that another
attack kept in the same storage never reuses its trials; a trial the interrupted session left
running is closed (with its run if it finished, else as failed); and the sampler is reseeded
from the number of finished trials, so that the resumed session does not replay the random
start-up draws of the first one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from undo_cli.errors import UsageError
from undo_cli.jsontext import is_finite_number, jsonable
from undo_cli.options import SEARCH_BATCH_SIZES, SEARCH_LORA_RANKS, AttackConfig, RunSpec

STUDY_NAME = "undo-relearn-attack"


def study_name(key: dict[str, Any]) -> str:
    """The study of the attack `key` describes (`relearn.results.search_key`): a digest of
    its canonical JSON."""
    text = json.dumps(jsonable(key), sort_keys=True, separators=(",", ":"))
    return f"undo-relearn-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def sampler_seed(seed: int, finished: int) -> int:
    """The TPE sampler's seed: `--seed` for a new study, else (and for a seed NumPy cannot
    take, 2**32 or more) one derived from `--seed` and the number of trials already finished,
    so that a resumed search draws new start-up configurations instead of replaying them."""
    if finished == 0 and 0 <= seed < 2**32:
        return seed
    digest = hashlib.blake2b(f"undo-search\0{seed}\0{finished}".encode(), digest_size=4)
    return int.from_bytes(digest.digest(), "little")


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise UsageError("--search needs Optuna: pip install 'undo-cli[search]' (or "
                         "pip install optuna)") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def sample_spec(trial: Any, config: AttackConfig, lora_rank: int | None) -> RunSpec:
    """The run a trial proposes: every dimension the flags leave open (module doc)."""
    optimizer = trial.suggest_categorical("optimizer", list(config.optimizers))
    grid = config.lr_grid(optimizer)
    lr = trial.suggest_float(f"lr_{optimizer}", min(grid), max(grid), log=True)
    schedule = trial.suggest_categorical("schedule", config.schedule_list())
    sizes = list(config.batch_sizes) if config.batch_sizes else list(SEARCH_BATCH_SIZES)
    batch_size = trial.suggest_categorical("batch_size", sizes)
    rank = None
    if lora_rank is not None:  # --lora: LoRA only; else full finetuning or LoRA
        modes = ["lora"] if config.lora else ["full", "lora"]
        if trial.suggest_categorical("mode", modes) == "lora":
            ranks = sorted({min(r, lora_rank) for r in SEARCH_LORA_RANKS})
            rank = trial.suggest_categorical("lora_rank", ranks)
    return RunSpec(lr=float(f"{lr:.3g}"), seed=config.train.seed, optimizer=optimizer,
                   schedule=schedule, batch_size=batch_size, lora_rank=rank,
                   lora_alpha=config.alpha_for(rank))


def search_runs(model: Any, config: AttackConfig,
                finetune: Callable[..., tuple[dict[str, Any], Any]], forget_metric: str,
                direction: str, lora_rank: int | None, progress: Any,
                study_name: str = STUDY_NAME) -> Iterator[tuple[dict[str, Any], Any]]:
    """Yield `(run, attacked model)` for every trial of the study, `config.search` in all;
    trials finished earlier in `config.search_storage` are yielded first, without a model.
    `lora_rank` is the model's largest usable LoRA rank (None: full finetuning only)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    sampler = optuna.samplers.TPESampler(seed=sampler_seed(config.train.seed, 0))
    study = optuna.create_study(
        study_name=study_name, storage=config.search_storage, load_if_exists=True,
        direction="maximize" if direction == "max" else "minimize", sampler=sampler,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5,
                                           n_warmup_steps=config.eval_every))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run = json.loads(stale.user_attrs["run"]) if "run" in stale.user_attrs else None
        _tell(study, stale.number, run, forget_metric)  # an interrupted session's trial
    done = [t for t in study.get_trials(deepcopy=False) if "run" in t.user_attrs
            and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    if done:
        study.sampler = optuna.samplers.TPESampler(
            seed=sampler_seed(config.train.seed, len(done)))
    for trial in done:
        yield json.loads(trial.user_attrs["run"]), None
    for index in range(len(done), config.search):
        trial = study.ask()
        spec = sample_spec(trial, config, lora_rank)
        progress.run_started(index + 1, spec.lr, spec.seed, spec.config_id)

        def stop(step: int, metrics: dict[str, float], trial=trial) -> bool:
            value = metrics.get(forget_metric)
            if not is_finite_number(value):
                return False
            trial.report(float(value), step)
            return trial.should_prune()

        run, attacked = finetune(spec, stop)
        run["trial"] = trial.number
        trial.set_user_attr("run", json.dumps(jsonable(run)))
        _tell(study, trial, run, forget_metric)
        yield run, attacked


def _tell(study: Any, trial: Any, run: dict[str, Any] | None, forget_metric: str) -> None:
    """Close `trial` (a trial or its number) with its `run`'s outcome: pruned, failed (a
    diverged run, no final value, or no run at all) or the forget metric at its last step."""
    from optuna.trial import TrialState

    value = run["curve"][-1].get(forget_metric) if run and run.get("curve") else None
    if run is not None and run.get("pruned"):
        study.tell(trial, state=TrialState.PRUNED)
    elif run is None or run.get("diverged") or not is_finite_number(value):
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, float(value))
