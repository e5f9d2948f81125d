#!/usr/bin/env bash
# The built-in default job: build a tiny model and apply UNDO's noise step to it.
# (Grows into the full arithmetic pipeline, examples/arithmetic.sh, as the commands land.)
set -euo pipefail
OUT="${OUT:-runs/quickstart}"
undo() { "${UNDO:-.venv/bin/undo}" "$@"; }

undo init "$OUT/base" --preset tiny --seed 0 --overwrite
undo perturb "$OUT/base" "$OUT/perturbed" --alpha 0.6 --beta 0.1 --seed 0 --overwrite
echo "done: $OUT/perturbed (see its undo.json for provenance)"
