"""`undo init`: a randomly initialised checkpoint with a locally built tokenizer."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from undo_cli.cli import app
from undo_cli.cli.common import emit_json, info
from undo_cli.cli.options import with_options
from undo_cli.options import SaveOptions, check_number, check_seed
from undo_cli.options.paths import plain_paths


@app.command("init")
@with_options("init", reads={"tokenizer": plain_paths}, save=SaveOptions)
def init_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    arch: str = typer.Option("llama", help="Architecture: llama, gemma2, gpt2 or qwen2."),
    preset: str = typer.Option(
        "tiny", help="Size preset: tiny (~0.5M params: 2 layers, 128 wide) or small (~10M: "
        "6 layers, 384 wide). Explicit sizes override it."),
    layers: int = typer.Option(None, help="Number of transformer layers."),
    hidden: int = typer.Option(None, help="Hidden (model) width."),
    heads: int = typer.Option(None, help="Attention heads (must divide --hidden)."),
    intermediate: int = typer.Option(None, help="MLP inner width."),
    max_position: int = typer.Option(None, help="Longest sequence the model accepts."),
    tokenizer: str = typer.Option(
        "char", help="'char' (printable ASCII, one token per character), 'char:ALPHABET', "
        "a tokenizer.json file or a directory holding a tokenizer. Never downloaded."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    *,
    save: SaveOptions,
) -> None:
    """Write a randomly initialised model + tokenizer (for tests, examples, random students)."""
    from undo_cli.checkpoint import (
        atomic_output,
        build_manifest,
        check_output_path,
        save_layout,
        save_model,
        write_manifest,
    )
    from undo_cli.modelfactory import (
        build_config,
        count_parameters,
        load_tokenizer_spec,
        random_model,
        resolve_shape,
    )

    start = time.time()
    for flag, value in (("--layers", layers), ("--hidden", hidden), ("--heads", heads),
                        ("--intermediate", intermediate), ("--max-position", max_position)):
        check_number(flag, value, minimum=1)
    check_seed("--seed", seed)
    reads = [("--tokenizer", tokenizer)] if Path(tokenizer).exists() else []
    check_output_path(out, overwrite=overwrite, reads=reads)
    shape = resolve_shape(preset, layers=layers, hidden=hidden, heads=heads,
                          intermediate=intermediate, max_position=max_position)
    tok = load_tokenizer_spec(tokenizer)
    config = build_config(arch, shape, tok)
    model = random_model(config, seed=seed)
    n_params = count_parameters(model)
    with atomic_output(out, overwrite=overwrite, reads=reads) as tmp:
        save_model(model, tok, tmp, layout=save_layout(save, None))
        write_manifest(tmp, build_manifest(
            "init", seed=seed, wall_time_s=time.time() - start,
            arguments=dict(arch=arch, preset=preset, tokenizer=tokenizer, **shape.__dict__,
                           save_dtype=save.save_dtype, max_shard_size=save.max_shard_size),
            extra={"parameters": n_params},
        ))
    summary = {"output": str(out), "arch": arch, "parameters": n_params,
               "vocab_size": len(tok), **shape.__dict__}
    if json_out:
        emit_json(summary)
    else:
        info(f"wrote {out}: {arch}, {n_params:,} parameters, vocabulary {len(tok)}")
