"""Checkpoint I/O, in one place: loading, atomic output directories, provenance manifests.

Every command that reads or writes a model goes through this package:

- `inspect_checkpoint`, `load_model`, `load_tokenizer`: read a Hugging Face checkpoint
  directory (single or sharded safetensors; a PEFT adapter directory is merged into its base),
  whole or not at all (headers, JSON and the loading report are checked; pickles refused).
- `atomic_output`: write into a temporary sibling directory and rename (or atomically swap)
  it into place, holding OUT's lock, so an interrupted command never leaves a (half-written)
  output directory and two runs never write the same one.
- `save_model`: model + tokenizer + carried-over support files into such a directory, in the
  dtype and shard size of a `Layout` (`save_layout`: the input's unless --save-dtype /
  --max-shard-size say otherwise).
- `build_manifest`, `write_manifest`, `read_manifest`, `fingerprint`: the `undo.json`
  provenance manifest written into every output directory.
"""

from undo_cli.checkpoint.inspection import CheckpointInfo, check_fits_memory, inspect_checkpoint
from undo_cli.checkpoint.load import (
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
)
from undo_cli.checkpoint.manifest import (
    MANIFEST_NAME,
    build_manifest,
    fingerprint,
    fingerprint_data,
    manifest_history,
    read_manifest,
    write_manifest,
)
from undo_cli.checkpoint.output import (
    Layout,
    atomic_file,
    atomic_output,
    check_output_path,
    copy_support_files,
    save_layout,
    save_model,
)

__all__ = [
    "MANIFEST_NAME",
    "CheckpointInfo",
    "Layout",
    "atomic_file",
    "atomic_output",
    "build_manifest",
    "check_fits_memory",
    "check_output_path",
    "copy_support_files",
    "fingerprint",
    "fingerprint_data",
    "inspect_checkpoint",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "manifest_history",
    "read_manifest",
    "save_layout",
    "save_model",
    "write_manifest",
]
