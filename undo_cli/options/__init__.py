"""Option groups: torch-free dataclasses, each setting declared once with its flag and help.

Every setting a command takes is a field of one of these groups, declared with `option(...)`:
its default, its help text, its flag, its help panel and the values it accepts. The command
line is generated from the fields (`undo_cli.cli.options.with_options`, as mergekit builds its
click options from `MergeOptions`), and the library takes the same objects, so a new setting
is one field here plus the code that uses it.

Parse, don't validate: a group settles itself when it is built (`__post_init__` ->
`settle`): structured text becomes typed values through the fields' `parse` hooks (byte
sizes, layer ranges, regular expressions, gate expressions parsed by `undo_cli.gates`, one
floor below: `text.py`), then `check` validates every value with a
message naming the flag (finite numbers, ranges, choices), then the group's checks across
fields run. An invalid group cannot exist, so nothing below the command line checks it again.

Defaults that differ by command are group instances in `defaults.py` (`TRAIN`, `UNLEARN`,
`DISTILL`, ...), the stage functions' own parameter defaults, which the command line reads
from the command's signature; every default learning rate is decided by `rates.default_lr`.
Every path-typed option is one of the command's declared reads (`paths.py`).

Modules: `base.py` (`option`, `settle`, `check`), `text.py` (typed text), `paths.py` (declared
reads), `rates.py` (learning rates), `groups.py` (the shared groups), `attack.py` (the
relearning attack), `storage.py` (`--search-storage`, checked when parsed), `commands.py`
(init, data language, eval, probe, report, perturb), `defaults.py` (per-command defaults and
help).

Groups: `TrainConfig` (the engine: optimizer, schedule, budgets, state), `DataOptions` (how
training data becomes rows), `EvalOptions` (the evaluation every command that measures
shares), `NoiseOptions` (perturb, and distill's in-memory noise), `GateOptions`,
`LoadOptions`, `OutputOptions`, `SaveOptions` (dtype and shards of a written model), and
one group per command (`UnlearnOptions`,
`DistillOptions`, `AttackConfig` with `AttackMeasurement`).
"""

from undo_cli.options.attack import (
    ATTACK_EVAL_EVERY,
    ATTACK_SCHEDULES,
    DEFAULT_LRS,
    EVAL_SCHEDULES,
    LINEAR_EVALUATIONS,
    PAPER_LRS,
    SEARCH_BATCH_SIZES,
    SEARCH_LORA_RANKS,
    AttackConfig,
    AttackMeasurement,
    RunSpec,
    evaluation_steps,
    parse_lrs,
)
from undo_cli.options.base import (
    ATTACK,
    DATA,
    DISTILLATION,
    EVALUATION,
    IN_OUT,
    MAX_RECORDS,
    MEASUREMENT,
    METHOD,
    NOISE,
    SEED_MAX,
    SELECTION,
    TRACKING,
    TRAINING,
    check,
    check_number,
    check_seed,
    compile_pattern,
    flag_of,
    option,
    parse_size,
    seed_option,
    settle,
)
from undo_cli.options.defaults import (
    ATTACK_TRAIN,
    COMMAND_HELP,
    DISTILL,
    DISTILL_EVAL_EVERY,
    DISTILL_NOISE,
    DISTILL_STOP_WHEN_CAP,
    TRAIN,
    TRAIN_STEPS,
    UNLEARN,
)
from undo_cli.options.groups import (
    BNB_OPTIMIZERS,
    CHOICE_FORMATS,
    DEFAULT_MAX_LENGTH,
    DEFAULT_PACKING,
    NOISES,
    OPTIMIZERS,
    PACKING_MODES,
    RESUME_KEYS,
    SAVE_DTYPES,
    SCHEDULES,
    TRACKERS,
    DataOptions,
    DistillOptions,
    EvalOptions,
    GateOptions,
    LoadOptions,
    NoiseOptions,
    OutputOptions,
    SaveOptions,
    TrainConfig,
    UnlearnOptions,
    check_trackers,
)

__all__ = [
    "ATTACK", "ATTACK_EVAL_EVERY", "ATTACK_SCHEDULES", "ATTACK_TRAIN", "COMMAND_HELP", "DISTILL",
    "DISTILL_NOISE", "TRAIN", "UNLEARN", "DATA", "EVAL_SCHEDULES", "LINEAR_EVALUATIONS",
    "DEFAULT_LRS", "DEFAULT_MAX_LENGTH", "DEFAULT_PACKING", "DISTILLATION", "DISTILL_EVAL_EVERY",
    "DISTILL_STOP_WHEN_CAP", "EVALUATION", "IN_OUT", "MEASUREMENT", "METHOD", "NOISE", "NOISES",
    "BNB_OPTIMIZERS", "OPTIMIZERS", "PACKING_MODES", "PAPER_LRS", "RESUME_KEYS", "SAVE_DTYPES",
    "SCHEDULES",
    "SEARCH_BATCH_SIZES", "SEARCH_LORA_RANKS", "SEED_MAX", "MAX_RECORDS", "SELECTION",
    "TRACKERS", "TRACKING", "TRAINING", "CHOICE_FORMATS", "check_trackers",
    "TRAIN_STEPS", "AttackConfig", "AttackMeasurement", "DataOptions", "DistillOptions",
    "EvalOptions", "GateOptions", "LoadOptions", "NoiseOptions", "OutputOptions",
    "RunSpec", "SaveOptions", "TrainConfig", "UnlearnOptions", "check", "check_number",
    "check_seed", "compile_pattern", "evaluation_steps", "flag_of", "option", "parse_lrs",
    "parse_size", "seed_option", "settle",
]
