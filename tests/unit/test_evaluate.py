"""The metric library: every metric against an independent direct computation with
transformers, batched == one-by-one, generation identical to one prompt at a time, errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import make_checkpoint, write_jsonl

from undo_cli.checkpoint import load_model, load_tokenizer
from undo_cli.errors import DataError, UsageError
from undo_cli.evaluate import (
    answers_match,
    choice_prompt,
    evaluate_model,
    flatten_metrics,
    load_eval_set,
)
from undo_cli.generation import greedy_generate, newline_token_ids
from undo_cli.records import read_eval_data

# --------------------------------------------------------------------------- fixtures



def _sum_example(rng: random.Random, eos: str) -> str:
    a, b = rng.randint(0, 30), rng.randint(0, 30)
    # Half the examples end in a newline, half in EOS: generation must stop at both.
    return f"{a} + {b} = {a + b}" + ("\n" if rng.random() < 0.5 else eos)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained briefly on sums, so its greedy answers vary (some right)."""
    path = make_checkpoint(tmp_path_factory.mktemp("models") / "trained", hidden=64,
                           intermediate=128, seed=1)
    model, tok = load_model(path), load_tokenizer(path)
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast for this size, and the same weights on every machine
    try:
        for _ in range(200):
            enc = [tok(_sum_example(rng, tok.eos_token))["input_ids"] for _ in range(24)]
            width = max(map(len, enc))
            ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in enc])
            labels = ids.masked_fill(ids == tok.pad_token_id, -100)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model = load_model(tiny_llama).eval()
    return model, load_tokenizer(tiny_llama)


def sum_rows(n: int, seed: int = 0, lo: int = 0, hi: int = 30) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        rows.append({"prompt": f"{a} + {b} = ", "answer": str(a + b)})
    return rows


def text_rows(n: int, seed: int = 0, longest: int = 60) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(f"{rng.randint(0, 99)} + {rng.randint(0, 9)}"
                              for _ in range(rng.randint(1, longest)))} for _ in range(n)]


def one_at_a_time(model, tok, prompt_ids: list[int], max_new_tokens: int,
                  moved: str = "") -> str:
    """The reference: `model.generate` on one prompt, decoded, without the whitespace `moved`
    from the prompt to the answer, cut at the first newline."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(
        1, len(prompt_ids), dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    text = tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
    if moved and text.startswith(moved):
        text = text[len(moved):]
    return text.split("\n", 1)[0]


def lm_eval_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's `_encode_pair`, written out: the context's trailing whitespace
    moves to the continuation, the whole text is tokenised and cut after the context."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tok(stripped)["input_ids"]
    whole = tok(stripped + continuation)["input_ids"]
    return ctx, whole[len(ctx):]


def generation_prompt(tok, prompt: str) -> tuple[list[int], str]:
    """(ids generated from, whitespace the answer starts with): the prompt without its
    trailing whitespace, as evaluation generates."""
    stripped = prompt.rstrip()
    return tok(stripped)["input_ids"], prompt[len(stripped):]


# --------------------------------------------------------------------------- text loss


def test_text_loss_equals_direct_computation(tmp_path, llama):
    model, tok = llama
    rows = text_rows(9, longest=50)  # up to ~300 characters: longer than the 128 window
    es = load_eval_set("t", write_jsonl(tmp_path / "t.jsonl", rows), tok)
    got = evaluate_model(model, tok, [es])["t"]

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = tok(row["text"])["input_ids"]
            # Windows of 128 tokens, each starting at the last token of the previous one.
            pos = 0
            while pos < len(ids) - 1:
                window = torch.tensor([ids[pos:pos + 128]])
                n = window.shape[1] - 1
                total += model(input_ids=window, labels=window).loss.item() * n
                count += n
                pos += 127
    assert any(len(tok(r["text"])["input_ids"]) > 128 for r in rows)
    assert got["tokens"] == count == sum(len(tok(r["text"])["input_ids"]) - 1 for r in rows)
    assert got["loss"] == pytest.approx(total / count, abs=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got["n"] == len(rows)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma2"])
def test_batched_equals_one_by_one(tmp_path, arch):
    path = make_checkpoint(tmp_path / arch, arch=arch)
    model, tok = load_model(path).eval(), load_tokenizer(path)
    rows = sum_rows(9, hi=999)
    sets = [
        load_eval_set("t", write_jsonl(tmp_path / "t.jsonl", text_rows(11, seed=3)), tok),
        load_eval_set("c", write_jsonl(tmp_path / "c.jsonl", rows), tok),
    ]
    many, auto = {}, {}
    single = evaluate_model(model, tok, sets, batch_size=1, generate=False)
    batched = evaluate_model(model, tok, sets, batch_size=4, max_new_tokens=5, answers=many)
    default = evaluate_model(model, tok, sets, max_new_tokens=5, answers=auto)
    for name in ("t", "c"):
        for key, value in single[name].items():
            assert batched[name][key] == pytest.approx(value, abs=1e-5)
            assert default[name][key] == pytest.approx(value, abs=1e-5)
    # Generation equals model.generate one prompt at a time, in any batching.
    prompts = [generation_prompt(tok, r["prompt"]) for r in rows]
    assert many["c"] == auto["c"] == [one_at_a_time(model, tok, p, 5, m) for p, m in prompts]
    assert batched["c"]["accuracy"] == default["c"]["accuracy"]


# --------------------------------------------------------------------------- completions


def test_completion_loss_and_accuracy_equal_direct_computation(tmp_path, trained):
    model, tok = trained
    rows = sum_rows(40, seed=5)
    es = load_eval_set("c", write_jsonl(tmp_path / "c.jsonl", rows), tok)
    answers: dict[str, list[str]] = {}
    got = evaluate_model(model, tok, [es], max_new_tokens=8, answers=answers)["c"]

    total, count, correct, texts = 0.0, 0, 0, []
    with torch.no_grad():
        for row in rows:
            prompt, completion = lm_eval_pair(tok, row["prompt"], row["answer"])
            completion = completion + [tok.eos_token_id]
            ids = torch.tensor([prompt + completion])
            labels = torch.tensor([[-100] * len(prompt) + completion])
            total += model(input_ids=ids, labels=labels).loss.item() * len(completion)
            count += len(completion)
            ids, moved = generation_prompt(tok, row["prompt"])
            text = one_at_a_time(model, tok, ids, 8, moved)
            texts.append(text)
            correct += text.strip() == row["answer"]
    assert answers["c"] == texts
    assert got["loss"] == pytest.approx(total / count, abs=1e-5)
    assert got["tokens"] == count
    assert got["accuracy"] == correct / len(rows)
    # The model is partly trained: its answers vary (and are not all right).
    assert correct < len(rows)
    assert len(set(texts)) >= 3


def test_trained_generation_identical_in_any_batching(trained):
    model, tok = trained
    rng = random.Random(7)
    # Prompts of very different lengths (1 to 40+ tokens) to stress left padding.
    prompts = [tok(" " * rng.randint(0, 30) + f"{rng.randint(0, 30)} + {rng.randint(0, 30)} = "
                   )["input_ids"] for _ in range(30)]
    reference = [one_at_a_time(model, tok, p, 8) for p in prompts]
    with torch.no_grad():
        for batch_size in (7, None):
            assert greedy_generate(model, tok, prompts, max_new_tokens=8,
                                   batch_size=batch_size) == reference


def test_generation_stops_at_newline_and_eos(trained):
    model, tok = trained
    assert newline_token_ids(tok) == set(tok("\n", add_special_tokens=False)["input_ids"])
    prompts = [tok(f"{a} + {b} = ")["input_ids"] for a in range(0, 30, 4) for b in range(3)]
    with torch.no_grad():
        answers = greedy_generate(model, tok, prompts, max_new_tokens=12)
        raw = greedy_generate(model, tok, prompts, max_new_tokens=12, stop_at_newline=False)
    assert all("\n" not in a for a in answers)
    # Some rows ended at a newline (the text goes on without the newline stop) ...
    assert any("\n" in r for r in raw)
    # ... and all are short: every row stopped at EOS or a newline, long before 12 tokens.
    assert all(len(a) <= 3 for a in answers)


def test_long_prompts_keep_their_last_tokens(tmp_path, llama):
    model, tok = llama
    rows = [{"prompt": "1 + 2 = " * 30, "answer": "3"}, {"prompt": "4 + 4 = ", "answer": "8"}]
    es = load_eval_set("c", write_jsonl(tmp_path / "c.jsonl", rows), tok)
    got = evaluate_model(model, tok, [es], max_new_tokens=4)
    # each answer scores its moved space, its digit and EOS (lm-eval's continuation " 3")
    assert got["c"]["n"] == 2 and got["c"]["tokens"] == 6


def test_generate_false_skips_accuracy(tmp_path, llama):
    model, tok = llama
    es = load_eval_set("c", write_jsonl(tmp_path / "c.jsonl", sum_rows(5)), tok)
    assert "accuracy" not in evaluate_model(model, tok, [es], generate=False)["c"]


@pytest.mark.parametrize(("generated", "answer", "match"), [
    ("84", "84", True), ("84.0", "84", True), (" 84 ", "84", True), ("84\n12", "84", False),
    ("084", "84", True), ("1e2", "100", True), ("-0", "0", True), ("85", "84", False),
    ("84 apples", "84", False), ("", "84", False), ("Paris", " Paris ", True),
    ("paris", "Paris", False), ("nan", "nan", True), ("inf", "infinity", False),
])
def test_answers_match(generated, answer, match):
    """Generation cuts at the stop strings (`--until`, default newline) before this compares:
    a newline left in an answer is part of it."""
    assert answers_match(generated, answer) is match


# --------------------------------------------------------------------------- multiple choice


def _choice_scores(model, tok, context: str, continuations: list[str]) -> list[float]:
    """Summed log-probabilities of each continuation, one forward pass per choice."""
    scores = []
    ctx = tok(context)["input_ids"]
    for cont in continuations:
        cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        scores.append(sum(logprobs[len(ctx) + k - 1, t].item() for k, t in enumerate(cont_ids)))
    return scores


@pytest.mark.parametrize("fmt", ["qa", "letters", "raw"])
def test_choice_accuracy_equals_direct_computation(tmp_path, trained, fmt):
    model, tok = trained
    rng = random.Random(11)
    rows = []
    for i in range(15):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        choices = [str(a + b + d) for d in rng.sample([-11, -1, 0, 1, 2, 10, 100], 4)]
        target = choices.index(str(a + b)) if str(a + b) in choices else 0
        answer: object = [target, str(target), "ABCD"[target]][i % 3]
        rows.append({"question": f"{a} + {b} =", "choices": choices, "answer": answer})
    es = load_eval_set("m", write_jsonl(tmp_path / "m.jsonl", rows), tok, choice_format=fmt)
    got = evaluate_model(model, tok, [es], batch_size=3)["m"]
    same = evaluate_model(model, tok, [es], batch_size=1)["m"]
    assert got == same

    acc = acc_norm = 0
    for row in rows:
        target = row["answer"] if isinstance(row["answer"], int) else (
            int(row["answer"]) if row["answer"].isdigit() else "ABCD".index(row["answer"]))
        q, ch = row["question"], row["choices"]
        if fmt == "qa":
            context, conts, shown = f"Question: {q}\nAnswer:", [" " + c for c in ch], ch
        elif fmt == "letters":
            context = q + "".join(f"\n{x}. {c}" for x, c in zip("ABCD", ch)) + "\nAnswer:"
            conts, shown = [" A", " B", " C", " D"], list("ABCD")
        else:
            context, conts, shown = q, ch, ch
        assert choice_prompt(q, ch, fmt) == (context, conts)
        scores = _choice_scores(model, tok, context, conts)
        best = max(range(4), key=lambda k: (scores[k], -k))
        norm = [s / len(c) for s, c in zip(scores, shown)]
        best_norm = max(range(4), key=lambda k: (norm[k], -k))
        acc += best == target
        acc_norm += best_norm == target
    assert got["accuracy"] == acc / len(rows)
    assert got["accuracy_norm"] == acc_norm / len(rows)
    assert got["n"] == len(rows)
    if fmt == "letters":
        assert got["accuracy"] == got["accuracy_norm"]


def test_choices_from_csv(tmp_path, llama):
    model, tok = llama
    path = tmp_path / "m.csv"
    path.write_text('question,choices,answer\n"2 + 2 =","[""4"", ""5""]",A\n')
    es = load_eval_set("m", path, tok)
    assert es.targets == [0] and len(es.sequences) == 2
    assert evaluate_model(model, tok, [es])["m"]["n"] == 1


# --------------------------------------------------------------------------- library behaviour


def test_evaluate_restores_modes_and_takes_no_gradients(tmp_path, tiny_llama):
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    es = load_eval_set("c", write_jsonl(tmp_path / "c.jsonl", sum_rows(4)), tok)
    seen = []
    hook = model.register_forward_hook(
        lambda mod, args, out: seen.append((mod.training, torch.is_grad_enabled())))
    evaluate_model(model, tok, [es], max_new_tokens=3)
    hook.remove()
    assert seen and all(state == (False, False) for state in seen)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def test_flatten_metrics():
    assert flatten_metrics({"retain": {"accuracy": 0.5, "n": 3}, "forget": {"loss": 1.0}}) == {
        "retain.accuracy": 0.5, "retain.n": 3, "forget.loss": 1.0}


def test_limit_is_a_seeded_sample_in_file_order(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", sum_rows(50))
    a = read_eval_data("c", path, limit=10, seed=1)
    b = read_eval_data("c", path, limit=10, seed=1)
    c = read_eval_data("c", path, limit=10, seed=2)
    lines = [r.line for r in a.records]
    assert lines == [r.line for r in b.records] == sorted(lines) and len(lines) == 10
    assert lines != [r.line for r in c.records]
    assert len(read_eval_data("c", path, limit=500)) == 50


def test_builtin_arithmetic_set():
    data = read_eval_data("retain", "arithmetic:retain_eval", limit=5)
    assert data.shape == "completion" and len(data) == 5
    assert data.source == "arithmetic:retain_eval"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("rows", "message", "line"), [
    ([{"text": "a"}, {"foo": 1}], "record has fields ['foo']", 2),
    ([{"question": "q", "answer": 0}], "'choices' is missing", 1),
    ([{"question": "q", "choices": ["a", "b"]}], "'answer' is missing", 1),
    ([{"question": "q", "choices": ["a"], "answer": 0},
      {"question": "q", "choices": ["a", "b"], "answer": 2}], "out of range for 2 choices", 2),
    ([{"question": "q", "choices": ["a", "b"], "answer": "C"}], "out of range", 1),
    ([{"question": "q", "choices": ["a", "b"], "answer": "-1"}], "index (0-based) or a letter", 1),
    ([{"question": "q", "choices": ["a", "b"], "answer": True}], "a choice index", 1),
    ([{"question": "q", "choices": "ab", "answer": 0}], "'choices' must be a list", 1),
    ([{"question": "q", "choices": [], "answer": 0}], "non-empty list", 1),
    ([{"question": "q", "choices": ["a", ""], "answer": 0}], "non-empty string", 1),
    ([{"prompt": "p", "answer": None}], "is missing", 1),
    ([{"text": ["a"]}], "'text' must be a string", 1),
    ([{"prompt": "1", "answer": "2"}, {"text": "x"}], "differs from the file's first", 2),
])
def test_bad_records_name_file_and_line(tmp_path, rows, message, line):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_eval_data("bad", path)
    assert message in str(err.value)
    assert f"{path}:{line}:" in str(err.value)


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_eval_data("e", empty)
    with pytest.raises(UsageError, match="not found"):
        read_eval_data("e", tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="--limit"):
        read_eval_data("e", empty, limit=0)


def test_untokenisable_records(tmp_path, llama):
    _, tok = llama
    with pytest.raises(DataError, match="nothing to predict"):
        load_eval_set("t", write_jsonl(tmp_path / "t.jsonl", [{"text": ""}, {"text": ""}]), tok)
    rows = [{"prompt": "1", "answer": "2"}, {"prompt": "", "answer": "2"}]
    load_eval_set("ok", write_jsonl(tmp_path / "ok.jsonl", rows), tok)  # BOS starts the prompt
    import copy

    from tokenizers import processors

    no_bos = copy.deepcopy(tok)
    no_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A", special_tokens=[])
    with pytest.raises(DataError, match=r"c.jsonl:2: the prompt is empty"):
        load_eval_set("c", write_jsonl(tmp_path / "c.jsonl", rows), no_bos)


def test_bad_arguments(tmp_path, llama):
    model, tok = llama
    es = load_eval_set("c", write_jsonl(tmp_path / "c.jsonl", sum_rows(2)), tok)
    with pytest.raises(UsageError, match="unique"):
        evaluate_model(model, tok, [es, es])
    with pytest.raises(UsageError, match="batch-size"):
        evaluate_model(model, tok, [es], batch_size=0)
    with pytest.raises(UsageError, match="choice format"):
        load_eval_set("c", tmp_path / "c.jsonl", tok, choice_format="nope")
