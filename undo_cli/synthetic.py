"""The synthetic arithmetic task of the paper's arithmetic setting (`undo data arithmetic`).

Retain = addition and subtraction, forget = multiplication and division. A data directory
written by `generate_arithmetic` (or `undo data arithmetic OUT_DIR`) holds:

- `retain_train.jsonl`, `forget_train.jsonl`: training text, records `{"text": ...}`, one
  bare equation ("12 + 7 = 19") or word problem ("Tom has 12 apples and gets 7 more. How
  many apples does Tom have now? Answer: 19") per record.
- `retain_eval.jsonl`, `forget_eval.jsonl`: evaluation items, records
  `{"prompt": ..., "answer": ..., "op": ..., "kind": ...}`: prompt "12 + 7 = " with answer
  "19", or a word problem ending in "Answer: " with its answer. `prompt + answer` is exactly
  the text as training formats it (the prompt keeps its trailing space). `op` is add, sub,
  mul or div; `kind` is `equation` or `word`; half of each operation's items (rounded up)
  are equations.
- `retain_eval_equation.jsonl`, `retain_eval_word.jsonl` (and `forget_...`): the same items
  split by kind. Tiny models learn the equations in minutes but hardly generalise to the
  held-out word-problem templates, so the equation files give the cleaner accuracy metric.
- `retain_eval_text.jsonl`, `forget_eval_text.jsonl`: the eval items as text records
  `{"text": prompt + answer}`, for a loss / perplexity metric.
- `forget_attack_train.jsonl`, `forget_attack_eval_equation.jsonl`,
  `forget_heldout_eval_equation.jsonl`: the forget facts in two disjoint halves (each forget
  operation's operand pairs split by a seeded shuffle; no pair in both): the training text and
  eval equations of half A, and the eval equations of half B. Attacking with half A and
  measuring half B tells knowledge that comes back (recovered) from knowledge the attack
  itself teaches (relearned): Deeb & Roger 2024. The other files are unchanged by this split.
- `info.json`: options, counts, ranges, held-out operand pairs, templates (training and
  held-out) and the alphabet; `undo.json`: the provenance manifest.

Operands: addition and subtraction use 0..add_max (subtraction only a >= b, so no result is
negative); multiplication uses factors 1..mul_max; division is exact, `(b*q) / b = q` with
divisor b and quotient q in 1..mul_max. All text is ASCII (characters in `ALPHABET`).

What is held out (checked by tests/unit/test_synthetic.py):

- Templates, always: eval word problems come only from held-out templates; every held-out
  template has a fixed phrase (its longest placeholder-free fragment) that occurs in no
  training template and so in no training record, and no training record matches a
  held-out template. Their operand pairs may be any valid pairs.
- Eval equations are distinct within a file (no pair twice per operation); eval word
  problems are distinct too.
- Operand pairs, with `heldout_pairs` = F > 0: a seeded share F of each operation's pair
  space (at least one pair, at most half) is reserved; no training record (equation or
  word problem) uses a reserved pair, and every eval equation uses one. Asking for more
  eval equations than there are reserved pairs is refused (`UsageError`).
- With F = 0 (the default), eval equations test facts that training text contains: a tiny
  model does not infer facts it never saw. Measured (2-layer, 128-wide Llama, char
  tokenizer, 3.5 minutes on 2 CPU cores, default sizes): 96-100% on every operation's eval
  equations with F = 0; with F = 0.3 only 70% (add), 30% (sub), 10% (mul) and 20% (div) of
  the unseen-pair equations, and 0-15% of held-out-template word problems either way. So
  holding pairs out by default would leave the forget set unlearned before unlearning
  starts; F > 0 is for studies of generalisation with larger models or budgets.

Everything is pure Python and deterministic per options and seed (same options and seed ->
byte-identical files); the default sizes take a fraction of a second.
"""

from __future__ import annotations

import math
import random
import re
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from undo_cli.errors import UsageError
from undo_cli.options import MAX_RECORDS, option
from undo_cli.options.base import seed_option, settle
from undo_cli.synthetic_files import TaskData, generate_task, write_task

OPS: dict[str, str] = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
SPLIT_OPS: dict[str, tuple[str, str]] = {"retain": ("add", "sub"), "forget": ("mul", "div")}
KINDS = ("equation", "word")
FILES: dict[str, str] = {
    "retain_train": "retain_train.jsonl",
    "forget_train": "forget_train.jsonl",
    "retain_eval": "retain_eval.jsonl",
    "forget_eval": "forget_eval.jsonl",
    "retain_eval_equation": "retain_eval_equation.jsonl",
    "forget_eval_equation": "forget_eval_equation.jsonl",
    "retain_eval_word": "retain_eval_word.jsonl",
    "forget_eval_word": "forget_eval_word.jsonl",
    "retain_eval_text": "retain_eval_text.jsonl",
    "forget_eval_text": "forget_eval_text.jsonl",
    # Disjoint forget facts (Deeb & Roger 2024): attack on half A, measure half B.
    "forget_attack_train": "forget_attack_train.jsonl",
    "forget_attack_eval_equation": "forget_attack_eval_equation.jsonl",
    "forget_heldout_eval_equation": "forget_heldout_eval_equation.jsonl",
}
ANSWER_CUE = " Answer: "
ALPHABET = string.digits + string.ascii_letters + " .,?:+-*/="
MAX_ADD = 1000  # operand-pair spaces are enumerated: keep them at most ~10**6 pairs
MAX_MUL = 1000
MAX_LISTED_PAIRS = 10_000  # info.json lists an operation's held-out pairs up to this many

NAMES = ("Tom", "Ann", "Sam", "Lily", "Ben", "Mia", "Max", "Zoe", "Leo", "Ava", "Noah", "Emma")
ITEMS = ("apple", "pencil", "sticker", "marble", "cookie", "book", "stamp", "coin", "shell",
         "card", "flower", "toy")
_PLURALS = {"box": "boxes", "child": "children"}

# Placeholders: {a} {b} numbers; {a:WORD} / {b:WORD} the number with WORD in the right number
# ("1 bag", "3 bags"; WORD `item` is the record's item noun); {items} the item noun's plural;
# {name} and {name2} two different names. For division a is the dividend, b the divisor.
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "{name} has {a:item} and gets {b} more. How many {items} does {name} have now?",
        "There are {a:item} in a box. {name} puts in {b} more. How many are in the box?",
        "{name} picks {a:item}, then {b} more. How many {items} did {name} pick?",
        "One shelf has {a:item} and another has {b:item}. How many {items} in all?",
    ),
    "sub": (
        "{name} has {a:item} and gives {b} away. How many {items} does {name} have left?",
        "There are {a:item} on a table. {name} takes {b}. How many are still there?",
        "{name} had {a:item} and lost {b}. How many {items} remain?",
        "A basket holds {a:item}. {name} removes {b}. How many are in the basket now?",
    ),
    "mul": (
        "{name} has {a:bag} with {b:item} in each. How many {items} does {name} have?",
        "There are {a:row} of {items}, {b} in each row. How many {items} are there?",
        "{name} buys {a:pack} of {b:item}. How many {items} does {name} buy?",
        "Each box holds {b:item}. How many {items} are in {a:box}?",
    ),
    "div": (
        "{name} shares {a:item} equally among {b:friend}. How many does each friend get?",
        "{name} packs {a:item} into bags of {b}. How many bags does {name} fill?",
        "{name} splits {a:item} into {b:group} of equal size. How many are in each group?",
        "There are {a:item} on {b:plate}, the same on each. How many are on each plate?",
    ),
}
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "{name} found {a:item} in the garden and bought {b} more at the shop. What is the "
        "total number of {items}?",
        "What is the sum of {a} and {b}?",
        "A jar contains {a:item}. After {name} adds {b:item}, how many {items} are inside "
        "the jar?",
    ),
    "sub": (
        "{name} started the day with {a:item} and sold {b} of them at the market. How many "
        "{items} were not sold?",
        "What do you get when you subtract {b} from {a}?",
        "{name} owns {a:item} and {name2} owns {b}. How many more {items} does {name} own "
        "than {name2}?",
    ),
    "mul": (
        "A teacher gives {a:student} {b:item} each. How many {items} does the teacher hand "
        "out altogether?",
        "What is the product of {a} and {b}?",
        "{name} collects {b:item} every day for {a:day}. How many {items} has {name} "
        "collected after those days?",
    ),
    "div": (
        "A coach divides {a:player} into {b:team} of equal size. How many players are on "
        "each team?",
        "What is {a} divided by {b}?",
        "If {a:item} are shared fairly between {b:child}, how many {items} does each child "
        "receive?",
    ),
}

PLACEHOLDER = re.compile(r"\{(a|b|name|name2|items)(?::([a-z]+))?\}")


# ----------------------------------------------------------------------------- text


def _plural(word: str) -> str:
    return _PLURALS.get(word, word + "s")


def render(template: str, a: int, b: int, *, name: str = "Tom", name2: str = "Ann",
           item: str = "apple") -> str:
    """Fill a word-problem template (placeholders: see above `TRAIN_TEMPLATES`)."""
    def fill(m: re.Match) -> str:
        key, word = m.group(1), m.group(2)
        if key in ("a", "b"):
            n = a if key == "a" else b
            if word is None:
                return str(n)
            word = item if word == "item" else word
            return f"{n} {word if n == 1 else _plural(word)}"
        return {"name": name, "name2": name2, "items": _plural(item)}[key]

    return PLACEHOLDER.sub(fill, template)


def compute(op: str, a: int, b: int) -> int:
    """The exact result of `a OP b` (`ValueError` for an inexact division)."""
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if op == "div":
        q, r = divmod(a, b)
        if r:
            raise ValueError(f"{a} / {b} is not exact")
        return q
    raise ValueError(f"unknown operation {op!r}")


def equation_prompt(op: str, a: int, b: int) -> str:
    """`"12 + 7 = "`: with the trailing space, so that the answer follows directly."""
    return f"{a} {OPS[op]} {b} = "


# ----------------------------------------------------------------------------- operand pairs


class PairSpace:
    """The valid operand pairs (a, b) of an operation, numbered 0..size-1 in a fixed order.

    add: a, b in 0..add_max; sub: 0 <= b <= a <= add_max; mul: a, b in 1..mul_max;
    div: (b*q, b) for divisor b and quotient q in 1..mul_max.
    """

    def __init__(self, op: str, add_max: int, mul_max: int):
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}")
        self.op = op
        self.n = add_max + 1 if op in ("add", "sub") else mul_max
        self.size = self.n * (self.n + 1) // 2 if op == "sub" else self.n * self.n

    def __len__(self) -> int:
        return self.size

    def pair(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        if self.op == "sub":
            a = (math.isqrt(8 * index + 1) - 1) // 2
            return a, index - a * (a + 1) // 2
        hi, lo = divmod(index, self.n)
        if self.op == "add":
            return hi, lo
        if self.op == "mul":
            return hi + 1, lo + 1
        divisor, quotient = hi + 1, lo + 1
        return divisor * quotient, divisor

    def pairs(self) -> list[tuple[int, int]]:
        return [self.pair(i) for i in range(self.size)]


def operand_pairs(op: str, add_max: int, mul_max: int) -> list[tuple[int, int]]:
    """Every valid (a, b) of an operation (see `PairSpace`)."""
    return PairSpace(op, add_max, mul_max).pairs()


# ----------------------------------------------------------------------------- options


def _share(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal counts, the larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _eval_equations(count: int) -> int:
    """How many of an operation's `count` eval items are equations (the rest: word problems)."""
    return count - count // 2


def _reserved_count(size: int, fraction: float) -> int:
    if fraction <= 0:
        return 0
    return min(size // 2, max(1, round(fraction * size)))


@dataclass(frozen=True)
class ArithmeticOptions:
    """Options of the generator (`undo data arithmetic`); impossible ones cannot be built
    (`UsageError`)."""

    seed: int = seed_option("Seed: the same seed and options give byte-identical files.")
    train_size: int = option(6000, "Training records per split (retain, forget), shared "
                             "equally by the split's two operations.")
    eval_size: int = option(200, "Evaluation items per split, shared equally by its two "
                            "operations; half of each operation's items (rounded up) are "
                            "equations, the rest word problems from held-out templates.")
    add_max: int = option(20, "Addition and subtraction operands are 0..N (subtraction keeps "
                          "a >= b).")
    mul_max: int = option(9, "Multiplication factors, divisors and quotients are 1..N "
                          "(division is always exact).")
    word_fraction: float = option(0.1, "Share of the training records that are word problems "
                                  "(the rest are bare equations).")
    heldout_pairs: float = option(0.0, "Share (0 to 0.5) of each operation's operand pairs "
                                  "kept out of all training text; eval equations then use only "
                                  "those pairs. 0: eval equations test facts seen in training "
                                  "(a tiny model cannot infer unseen multiplication facts).")

    def __post_init__(self) -> None:
        settle(self)
        for flag, value in (("--train-size", self.train_size), ("--eval-size", self.eval_size)):
            if value > MAX_RECORDS:
                raise UsageError(f"{flag} must be at most {MAX_RECORDS:,} (got {value})")
        if self.train_size < 1:
            raise UsageError(f"--train-size must be at least 1 (got {self.train_size})")
        if self.eval_size < 1:
            raise UsageError(f"--eval-size must be at least 1 (got {self.eval_size})")
        if not 1 <= self.add_max <= MAX_ADD:
            raise UsageError(f"--add-max must lie in 1..{MAX_ADD} (got {self.add_max})")
        if not 2 <= self.mul_max <= MAX_MUL:
            raise UsageError(f"--mul-max must lie in 2..{MAX_MUL} (got {self.mul_max})")
        if not 0.0 <= self.word_fraction <= 1.0:
            raise UsageError(f"--word-fraction must lie in [0, 1] (got {self.word_fraction})")
        if not 0.0 <= self.heldout_pairs <= 0.5:
            raise UsageError(
                f"--heldout-pairs must lie in [0, 0.5] (got {self.heldout_pairs})")
        for split, ops in SPLIT_OPS.items():
            option = "--add-max" if split == "retain" else "--mul-max"
            for op, count in zip(ops, _share(self.eval_size, len(ops))):
                need = _eval_equations(count)
                size = len(PairSpace(op, self.add_max, self.mul_max))
                if self.heldout_pairs > 0:
                    have = _reserved_count(size, self.heldout_pairs)
                    if need > have:
                        raise UsageError(
                            f"--eval-size {self.eval_size} needs {need} {op} equations on "
                            f"held-out pairs, but --heldout-pairs {self.heldout_pairs} reserves "
                            f"{have} of the {size} {op} pairs: raise --heldout-pairs or "
                            f"{option}, or lower --eval-size")
                elif need > size:
                    raise UsageError(
                        f"--eval-size {self.eval_size} needs {need} distinct {op} equations, "
                        f"but there are only {size} {op} operand pairs: raise {option} or "
                        "lower --eval-size")


# ----------------------------------------------------------------------------- generation


def _cycle(rng: random.Random, pool: list, n: int) -> list:
    """`n` items of `pool` in shuffled passes (each item once per pass, so balanced)."""
    out: list = []
    while len(out) < n:
        take = n - len(out)
        if take < len(pool):
            out.extend(rng.sample(pool, take))
        else:
            batch = list(pool)
            rng.shuffle(batch)
            out.extend(batch)
    return out


def _word_fields(rng: random.Random) -> dict[str, str]:
    name, name2 = rng.sample(NAMES, 2)
    return {"name": name, "name2": name2, "item": rng.choice(ITEMS)}


def _eval_word_problems(rng: random.Random, op: str, space: PairSpace,
                        n: int) -> list[dict[str, Any]]:
    """`n` distinct word problems from the held-out templates of `op` (any operand pairs)."""
    templates = HELDOUT_TEMPLATES[op]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        a, b = space.pair(rng.randrange(len(space)))
        prompt = render(templates[len(out) % len(templates)], a, b,
                        **_word_fields(rng)) + ANSWER_CUE
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "answer": str(compute(op, a, b)), "op": op,
                        "kind": "word"})
    else:  # pragma: no cover - the template x name x item x pair space is far larger
        raise UsageError(f"cannot draw {n} distinct held-out {op} word problems: raise "
                         "--add-max / --mul-max or lower --eval-size")
    return out


ArithmeticData = TaskData  # records per file key plus the info.json payload


def arithmetic_records(task: ArithmeticOptions | None = None, **options: Any) -> ArithmeticData:
    """Generate every file's records in memory (see the module docstring); deterministic.

    `task`, or options that are the fields of `ArithmeticOptions` (seed, train_size,
    eval_size, add_max, mul_max, word_fraction, heldout_pairs); `UsageError` for impossible
    values.
    """
    try:
        opts = task or ArithmeticOptions(**options)
    except TypeError as e:
        raise UsageError(f"arithmetic data: {e}") from e
    rng = random.Random(f"undo-arithmetic:{opts.seed}")
    records: dict[str, list[dict[str, Any]]] = {}
    heldout: dict[str, list[list[int]]] = {}
    counts: dict[str, dict[str, int]] = {}
    halves = random.Random(f"undo-arithmetic-halves:{opts.seed}")  # its own stream
    half_a: set[tuple[str, int]] = set()  # (op, pair index) of the forget facts' half A
    for split, ops in SPLIT_OPS.items():
        train: list[dict[str, Any]] = []
        evals: list[dict[str, Any]] = []
        facts: dict[int, tuple[str, int]] = {}  # id(record) -> its (op, pair index)
        for op, n_train, n_eval in zip(ops, _share(opts.train_size, len(ops)),
                                       _share(opts.eval_size, len(ops))):
            space = PairSpace(op, opts.add_max, opts.mul_max)
            n_eq_eval = _eval_equations(n_eval)
            n_reserved = _reserved_count(len(space), opts.heldout_pairs)
            if n_reserved:
                reserved = rng.sample(range(len(space)), n_reserved)
                taken = set(reserved)
                pool = [i for i in range(len(space)) if i not in taken]
                eval_pairs = reserved[:n_eq_eval]
                if n_reserved <= MAX_LISTED_PAIRS:
                    heldout[op] = [list(space.pair(i)) for i in sorted(reserved)]
            else:
                pool = list(range(len(space)))
                eval_pairs = rng.sample(pool, n_eq_eval)
            n_word = round(n_train * opts.word_fraction)
            for i in _cycle(rng, pool, n_train - n_word):
                a, b = space.pair(i)
                train.append({"text": equation_prompt(op, a, b) + str(compute(op, a, b))})
                facts[id(train[-1])] = (op, i)
            templates = TRAIN_TEMPLATES[op]
            for i, t in zip(_cycle(rng, pool, n_word),
                            _cycle(rng, list(range(len(templates))), n_word)):
                a, b = space.pair(i)
                text = render(templates[t], a, b, **_word_fields(rng))
                train.append({"text": text + ANSWER_CUE + str(compute(op, a, b))})
                facts[id(train[-1])] = (op, i)
            for i in eval_pairs:
                a, b = space.pair(i)
                evals.append({"prompt": equation_prompt(op, a, b),
                              "answer": str(compute(op, a, b)), "op": op, "kind": "equation"})
                facts[id(evals[-1])] = (op, i)
            if split == "forget":
                order = list(range(len(space)))
                halves.shuffle(order)
                half_a |= {(op, i) for i in order[:len(order) // 2]}
            evals.extend(_eval_word_problems(rng, op, space, n_eval - n_eq_eval))
            counts[op] = {"operand_pairs": len(space), "heldout_pairs": n_reserved,
                          "train_equations": n_train - n_word, "train_word_problems": n_word,
                          "eval_equations": n_eq_eval, "eval_word_problems": n_eval - n_eq_eval}
        rng.shuffle(train)
        rng.shuffle(evals)
        records[f"{split}_train"] = train
        records[f"{split}_eval"] = evals
        for kind in KINDS:
            records[f"{split}_eval_{kind}"] = [r for r in evals if r["kind"] == kind]
        records[f"{split}_eval_text"] = [{"text": r["prompt"] + r["answer"]} for r in evals]
        if split == "forget":  # the disjoint halves: operand pairs never shared
            records["forget_attack_train"] = [r for r in train if facts[id(r)] in half_a]
            equations = records["forget_eval_equation"]
            records["forget_attack_eval_equation"] = [r for r in equations
                                                      if facts[id(r)] in half_a]
            records["forget_heldout_eval_equation"] = [r for r in equations
                                                       if facts[id(r)] not in half_a]
    info = {
        "task": "arithmetic",
        "options": asdict(opts),
        "files": dict(FILES),
        "splits": {split: list(ops) for split, ops in SPLIT_OPS.items()},
        "ranges": {"add": [0, opts.add_max], "sub": [0, opts.add_max],
                   "mul": [1, opts.mul_max], "div": {"divisor": [1, opts.mul_max],
                                                     "quotient": [1, opts.mul_max]}},
        "counts": counts,
        "equation_format": "'A OP B = RESULT'; eval prompt 'A OP B = ', answer 'RESULT'",
        "answer_cue": ANSWER_CUE,
        "heldout_pairs": heldout,
        "forget_halves": {"attack": "forget_attack_train (text), forget_attack_eval_equation",
                          "heldout": "forget_heldout_eval_equation",
                          "rule": "each forget operation's operand pairs split in two halves "
                                  "by a seeded shuffle; no pair is in both"},
        "templates": {"train": {k: list(v) for k, v in TRAIN_TEMPLATES.items()},
                      "heldout": {k: list(v) for k, v in HELDOUT_TEMPLATES.items()}},
        "alphabet": ALPHABET,
    }
    return ArithmeticData(records=records, info=info)


# ----------------------------------------------------------------------------- files


def write_arithmetic(data: ArithmeticData, directory: str | Path) -> dict[str, Path]:
    """Write `data`'s JSONL files and `info.json` into an existing directory; their paths
    (keys of `FILES`, plus `info`)."""
    return write_task(directory, FILES, data.records, data.info)


def generate_arithmetic(out_dir: str | Path, *, overwrite: bool = False,
                        task: ArithmeticOptions | None = None,
                        **options: Any) -> dict[str, Path]:
    """Generate the task into `out_dir` atomically, with `undo.json`; the written paths
    (keys of `FILES`, plus `info`).

    `task` or `options` are those of `arithmetic_records`. Options and the output path are checked
    before anything is written (`UsageError`).
    """
    started = time.time()
    data = arithmetic_records(task, **options)
    return generate_task(out_dir, "arithmetic", FILES, data, overwrite=overwrite, started=started)
