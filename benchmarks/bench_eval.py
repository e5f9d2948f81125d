"""Exact-match accuracy: batched greedy generation against one prompt at a time.

A tiny model (preset `tiny`, ~0.5M parameters, character tokenizer) is trained briefly on
sums so that its answers vary, then answers N prompt/answer pairs ("12 + 7 = " -> "19")
twice, side by side in one run:

- one at a time: `model.generate` on each prompt alone, greedy, stopping at EOS, decoded and
  cut at the first newline (how the paper's code evaluates);
- batched: `undo_cli.generation.greedy_generate` (left padding, length-sorted batches, rows
  stop at EOS or a newline).

It asserts the answers are identical and prints the times, the speedup and the machine load.

    python benchmarks/bench_eval.py [--pairs 400] [--train-steps 400] [--threads 1]
                                    [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from undo_cli.evaluate import answers_match  # noqa: E402
from undo_cli.generation import greedy_generate  # noqa: E402
from undo_cli.modelfactory import (  # noqa: E402
    build_char_tokenizer,
    build_config,
    count_parameters,
    random_model,
    resolve_shape,
)
from undo_cli.runtime import quiet_libraries  # noqa: E402


def pairs(n: int, seed: int, hi: int = 20) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if rng.random() < 0.5:
            out.append((f"{a} + {b} = ", str(a + b)))
        else:
            a, b = max(a, b), min(a, b)
            out.append((f"{a} - {b} = ", str(a - b)))
    return out


def train(model, tok, steps: int, device: torch.device, seed: int = 0) -> float:
    """A few hundred AdamW steps on sums/differences (loss on the answer + EOS)."""
    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = pairs(32, rng.random())
        enc = [tok(p + a)["input_ids"] + [tok.eos_token_id] for p, a in batch]
        width = max(map(len, enc))
        ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in enc], device=device)
        labels = ids.masked_fill(ids == tok.pad_token_id, -100)
        for row, (p, _) in enumerate(batch):  # learn the answers only
            labels[row, :len(p)] = -100
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def one_at_a_time(model, tok, prompts: list[list[int]], max_new_tokens: int,
                  device: torch.device) -> list[str]:
    """The reference: `model.generate` per prompt, decoded, cut at the first newline."""
    answers = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, len(p):], skip_special_tokens=True)
        answers.append(text.split("\n", 1)[0])
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    quiet_libraries()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = build_char_tokenizer()
    model = random_model(build_config("llama", resolve_shape("tiny"), tok), seed=args.seed)
    model.to(device)
    t0 = time.perf_counter()
    final_loss = train(model, tok, args.train_steps, device, args.seed)
    train_s = time.perf_counter() - t0

    data = pairs(args.pairs, seed=args.seed + 1000)
    prompts = [tok(p)["input_ids"] for p, _ in data]
    with torch.no_grad():
        greedy_generate(model, tok, prompts[:8], max_new_tokens=2)  # warm-up
        t0 = time.perf_counter()
        batched = greedy_generate(model, tok, prompts, max_new_tokens=args.max_new_tokens)
        batched_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = one_at_a_time(model, tok, prompts, args.max_new_tokens, device)
        single_s = time.perf_counter() - t0

    differ = [i for i, (a, b) in enumerate(zip(batched, single)) if a != b]
    accuracy = sum(answers_match(a, gold) for a, (_, gold) in zip(batched, data)) / len(data)
    result = {
        "device": str(device), "threads": args.threads, "parameters": count_parameters(model),
        "train_steps": args.train_steps, "train_s": round(train_s, 1),
        "final_train_loss": round(final_loss, 4), "pairs": len(data),
        "distinct_answers": len(set(batched)), "accuracy": accuracy,
        "one_at_a_time_s": round(single_s, 3), "batched_s": round(batched_s, 3),
        "speedup": round(single_s / batched_s, 1), "identical_answers": not differ,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    examples = [(batched[i], single[i]) for i in differ[:5]]
    assert not differ, f"{len(differ)} answers differ, e.g. {examples}"


if __name__ == "__main__":
    main()
