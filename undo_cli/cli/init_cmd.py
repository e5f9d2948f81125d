"""`undo init`: a randomly initialised checkpoint with a locally built tokenizer."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from undo_cli.cli import app
from undo_cli.cli.common import emit_json, info
from undo_cli.cli.options import with_options
from undo_cli.options import SaveOptions, check_number, check_seed


@app.command("init")
@with_options("init", save=SaveOptions)
def init_command(
    out: Path = typer.Argument(..., metavar="OUT", help="Output checkpoint directory."),
    arch: str = typer.Option("llama", help="Architecture: llama, gemma2, gpt2, qwen2, mistral "
                             "(Zephyr), gpt_neox (Pythia, Deep Ignorance) or phi3."),
    preset: str = typer.Option(
        "tiny", help="Size preset: tiny (~0.5M params: 2 layers, 128 wide) or small (~10M: "
        "6 layers, 384 wide). Explicit sizes override it."),
    layers: int = typer.Option(None, help="Number of transformer layers."),
    hidden: int = typer.Option(None, help="Hidden (model) width."),
    heads: int = typer.Option(None, help="Attention heads (must divide --hidden)."),
    intermediate: int = typer.Option(None, help="MLP inner width."),
    max_position: int = typer.Option(None, help="Longest sequence the model accepts."),
    tokenizer: str = typer.Option(
        "char", help="'char' (printable ASCII, one token per character); 'char:ALPHABET' "
        "(one token per character of ALPHABET, any Unicode characters as written; backslash "
        "escapes such as \\n or \\u00e4 work too); 'bpe:N' (a byte-level BPE of N tokens, "
        "N >= 260, trained on --tokenizer-data: any language round-trips); a tokenizer.json "
        "file; or a directory holding a tokenizer. Never downloaded."),
    tokenizer_data: list[Path] = typer.Option(
        None, "--tokenizer-data", metavar="FILE",
        help="Records to train --tokenizer bpe:N on (repeatable; any --data format: text, "
        "prompt/completion or questions). Deterministic: the same files in the same order "
        "give a byte-identical tokenizer; undo.json records each file's fingerprint."),
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
        fingerprint_data,
        save_layout,
        save_model,
        write_manifest,
    )
    from undo_cli.modelfactory import (
        build_config,
        count_parameters,
        describe_shape,
        load_tokenizer_spec,
        random_model,
        resolve_shape,
    )

    start = time.time()
    for flag, value in (("--layers", layers), ("--hidden", hidden), ("--heads", heads),
                        ("--intermediate", intermediate), ("--max-position", max_position)):
        check_number(flag, value, minimum=1)
    check_seed("--seed", seed)
    save.validate()
    reads = [("--tokenizer", tokenizer)] if Path(tokenizer).exists() else []
    reads += [("--tokenizer-data", path) for path in tokenizer_data or []]
    check_output_path(out, overwrite=overwrite, reads=reads)
    shape = resolve_shape(preset, layers=layers, hidden=hidden, heads=heads,
                          intermediate=intermediate, max_position=max_position)
    tok = load_tokenizer_spec(tokenizer, tokenizer_data)
    config = build_config(arch, shape, tok)
    model = random_model(config, seed=seed, what=describe_shape(shape))
    n_params = count_parameters(model)
    with atomic_output(out, overwrite=overwrite, reads=reads) as tmp:
        save_model(model, tok, tmp, layout=save_layout(save, None))
        write_manifest(tmp, build_manifest(
            "init", seed=seed, wall_time_s=time.time() - start,
            arguments=dict(arch=arch, preset=preset, tokenizer=tokenizer, **shape.__dict__,
                           save_dtype=save.save_dtype, max_shard_size=save.max_shard_size,
                           tokenizer_data=[{"path": str(p), "fingerprint": fingerprint_data(p)}
                                           for p in tokenizer_data or []]),
            extra={"parameters": n_params},
        ))
    summary = {"output": str(out), "arch": arch, "parameters": n_params,
               "vocab_size": len(tok), **shape.__dict__}
    if json_out:
        emit_json(summary)
    else:
        info(f"wrote {out}: {arch}, {n_params:,} parameters, vocabulary {len(tok)}")
