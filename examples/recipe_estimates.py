"""Memory and time estimates of the real-scale recipes (examples/*.sh), from undo's memory plan
(`undo_cli.checkpoint.plan`, what `undo plan` prints) on the published configs of the models.

Nothing here ran on a GPU: the memory figures are the plan's arithmetic (checked against
measured CPU peaks on small models: docs/benchmarks.md, "memory"), the times assume
`--gpu-tflops` sustained (default 300 TFLOP/s of bf16, ~40% of an H100's dense peak) for the
6 * P_trained-ish FLOPs per token of the engine's accounting. Run `undo plan CMD ARGS` on your
own checkpoint for its exact figures on your device.

    python examples/recipe_estimates.py [--gpu-tflops 300]
"""

from __future__ import annotations

import argparse

from undo_cli.checkpoint.plan import format_bytes, plan_memory

# Published config.json values (sizes only).
MODELS = {
    "Zephyr-7B-beta (mistral)": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        max_position_embeddings=32768, tie_word_embeddings=False),
    "Llama-3-8B-Instruct (llama)": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        max_position_embeddings=8192, tie_word_embeddings=False),
    "Deep Ignorance 6.9B (gpt_neox, Pythia-6.9B shape)": dict(
        model_type="gpt_neox", vocab_size=50432, hidden_size=4096, num_hidden_layers=32,
        num_attention_heads=32, intermediate_size=16384, max_position_embeddings=2048,
        tie_word_embeddings=False),
    "Gemma-2-2B (gemma2)": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, intermediate_size=9216,
        max_position_embeddings=8192, tie_word_embeddings=True),
}
GPU = 80e9  # one 80 GB GPU

# (label, plan options): batch 4 x 1024 tokens per micro-batch, one process unless said.
SETTINGS = [
    ("AdamW, fp32 master, --bf16", dict(bf16=True)),
    ("AdamW, --bf16 --gradient-checkpointing", dict(bf16=True, gradient_checkpointing=True)),
    ("adamw8bit, --bf16-weights --gradient-checkpointing",
     dict(optimizer="adamw8bit", bf16_weights=True, gradient_checkpointing=True)),
    ("adafactor, --bf16-weights --gradient-checkpointing",
     dict(optimizer="adafactor", bf16_weights=True, gradient_checkpointing=True)),
    ("LoRA r=128, --bf16-weights --gradient-checkpointing",
     dict(lora_rank=128, bf16_weights=True, gradient_checkpointing=True)),
    ("AdamW --bf16, FSDP over 8 GPUs, checkpointing",
     dict(bf16=True, gradient_checkpointing=True, processes=8, sharded=True)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-tflops", type=float, default=300.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    for name, config in MODELS.items():
        print(f"\n{name}: batch {args.batch} x {args.length} tokens per micro-batch, one 80 GB "
              "GPU per process")
        print("| setting | parameters | weights | grads | optimizer | activations | total "
              "per GPU | fits 80 GB | s per 1M tokens |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, options in SETTINGS:
            plan = plan_memory(config, batch_size=args.batch, length=args.length,
                               device="cuda", available=int(GPU), **options)
            flops = (4 * plan.parameters + 2 * plan.trainable) * 1e6  # (2P + 2P + 2P_trained)
            if options.get("gradient_checkpointing"):
                flops += 2 * plan.parameters * 1e6  # the recomputed forward
            seconds = flops / (args.gpu_tflops * 1e12 * plan.processes)
            print(f"| {label} | {plan.parameters / 1e9:.2f}B | {format_bytes(plan.weights)} | "
                  f"{format_bytes(plan.gradients)} | {format_bytes(plan.optimizer_state)} | "
                  f"{format_bytes(plan.activations)} | {format_bytes(plan.total)} | "
                  f"{'yes' if plan.fits else 'no'} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
