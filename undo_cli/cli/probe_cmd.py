"""`undo probe`: linear probes of the forget knowledge in the hidden states, per layer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from undo_cli.cli.app import app
from undo_cli.cli.common import emit_json, err_console, info, show_output
from undo_cli.cli.options import with_options
from undo_cli.options import LoadOptions, OutputOptions
from undo_cli.options.commands import ProbeOptions
from undo_cli.options.inputs import ProbeInputs


def render(results: list[dict[str, Any]]) -> None:
    from rich.table import Table

    for name in results[0]["probes"]:
        probe0 = results[0]["probes"][name]
        table = Table(title=f"probe accuracy on {name} ({probe0['test']} held-out records, "
                            f"{probe0['classes']} classes; majority baseline "
                            f"{probe0['baseline']:.3f})", title_justify="left")
        table.add_column("checkpoint", overflow="fold")
        for layer in probe0["layers"]:
            table.add_column("emb" if layer < 0 else f"L{layer}", justify="right")
        table.add_column("best", justify="right")
        for result in results:
            probe = result["probes"][name]
            table.add_row(result["checkpoint"], *[f"{a:.2f}" for a in probe["accuracy"]],
                          f"{probe['best_accuracy']:.2f} (L{probe['best_layer']})")
        err_console.print(table)


@app.command("probe")
@with_options("probe", inputs=ProbeInputs, probe=ProbeOptions, load=LoadOptions,
              output=OutputOptions)
def probe_command(
    checkpoints: list[Path] = typer.Argument(..., metavar="CKPT...",
                                             help="Checkpoints to probe (e.g. base, unlearned, "
                                             "UNDO and oracle: one table)."),
    *,
    inputs: ProbeInputs,
    probe: ProbeOptions,
    load: LoadOptions,
    output: OutputOptions,
) -> None:
    """Is the forget knowledge still linearly readable? A logistic-regression probe per layer.

    For every checkpoint, set and layer, a multinomial logistic regression on the hidden state
    at the last prompt token predicts the answer's first token (prompt/answer records) or the
    correct choice (multiple choice); it is fitted on a seeded share of the records and scored
    on the rest, against the majority-class baseline. Unlearning that only suppresses outputs
    leaves such probes well above the baseline.
    """
    from undo_cli.checkpoint import check_output_path
    from undo_cli.probe import probe_checkpoints, write_probe
    from undo_cli.records import read_eval_data

    started = time.time()
    talk = show_output(output.quiet)
    out = probe.out
    sets = [read_eval_data(spec.name, spec.path) for spec in inputs.data]
    if out is not None:
        check_output_path(out, inputs=list(checkpoints), overwrite=output.overwrite)
    results = probe_checkpoints(
        checkpoints, sets, seed=probe.seed, train_share=probe.train_share,
        allow_pickle=load.allow_pickle, trust_remote_code=load.trust_remote_code,
        base_model=load.base_model, device=probe.device,
        on_start=(lambda c: info(f"probing {c}")) if talk else None)
    payload = {"results": results, "seed": probe.seed, "train_share": probe.train_share}
    if out is not None:
        write_probe(out, payload, checkpoints, overwrite=output.overwrite, started=started)
    if output.json:
        emit_json(payload)
    elif talk:
        render(results)
        info(f"done in {time.time() - started:.1f}s" + (f"; wrote {out}" if out else ""))
