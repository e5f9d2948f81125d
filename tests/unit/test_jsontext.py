"""Every JSON undo writes is strict JSON: NaN and infinities become null (undo_cli/jsontext.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from undo_cli.checkpoint import build_manifest, write_manifest
from undo_cli.cli.common import emit_json
from undo_cli.jsontext import jsonable, to_json


def strict_loads(text: str):
    """json.loads that fails on the non-standard words NaN, Infinity and -Infinity."""

    def refuse(word: str):
        raise ValueError(f"non-standard JSON constant {word}")

    return json.loads(text, parse_constant=refuse)


def test_strict_loads_refuses_what_plain_json_dumps_writes():
    with pytest.raises(ValueError, match="NaN"):
        strict_loads(json.dumps({"a": math.nan}))


def test_jsonable_maps_every_kind_of_value():
    class Thing:
        def __str__(self) -> str:
            return "thing"

    value = {
        "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "float": 0.25, "int": 3,
        "bool": True, "none": None, "tuple": (1, math.nan), 7: "key", "path": Path("/a/b"),
        "np32": np.float32(0.5), "np_nan": np.float64("nan"), "np_int": np.int64(4),
        "torch": torch.tensor(1.5), "torch_inf": torch.tensor(float("inf")),
        "nested": [{"x": [math.inf]}], "other": Thing(),
    }
    assert jsonable(value) == {
        "nan": None, "inf": None, "-inf": None, "float": 0.25, "int": 3, "bool": True,
        "none": None, "tuple": [1, None], "7": "key", "path": "/a/b", "np32": 0.5,
        "np_nan": None, "np_int": 4, "torch": 1.5, "torch_inf": None,
        "nested": [{"x": [None]}], "other": "thing",
    }
    assert type(jsonable(np.int64(4))) is int and jsonable(True) is True


def test_to_json_is_strict():
    text = to_json({"loss": math.nan, "steps": [1, math.inf]}, indent=2)
    assert strict_loads(text) == {"loss": None, "steps": [1, None]}


def test_manifest_with_a_nan_metric_is_strict_json(tmp_path):
    manifest = build_manifest("eval", arguments={"lr": math.inf}, metrics={"acc": math.nan,
                                                                           "loss": 1.5})
    file = write_manifest(tmp_path, manifest)
    written = strict_loads(file.read_text())
    assert written["metrics"] == {"acc": None, "loss": 1.5}
    assert written["arguments"] == {"lr": None}


def test_json_output_is_strict(capsys):
    emit_json({"forget_accuracy": math.nan, "out": Path("x")})
    assert strict_loads(capsys.readouterr().out) == {"forget_accuracy": None, "out": "x"}
