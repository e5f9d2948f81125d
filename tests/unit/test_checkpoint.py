"""Checkpoint I/O: loading (sharded, adapters, pickles), atomic outputs and manifests."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from undo_cli.checkpoint import (
    Layout,
    atomic_output,
    build_manifest,
    copy_support_files,
    fingerprint,
    inspect_checkpoint,
    load_model,
    load_tokenizer,
    manifest_history,
    read_manifest,
    save_model,
    write_manifest,
)
from undo_cli.errors import UndoError, UsageError


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_matches_from_pretrained(tiny_llama):
    model = load_model(tiny_llama)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.dtype == torch.float32
    assert _same_weights(model, reference)
    tok = load_tokenizer(tiny_llama)
    assert tok.decode(tok("12 + 7 = 19")["input_ids"], skip_special_tokens=True) == "12 + 7 = 19"


def test_sharded_checkpoint_loads(tiny_llama, tmp_path):
    model = load_model(tiny_llama)
    sharded = tmp_path / "sharded"
    save_model(model, load_tokenizer(tiny_llama), sharded, layout=Layout("float32", 20_000))
    info = inspect_checkpoint(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(info.weight_files) > 1
    assert _same_weights(load_model(sharded), model)


def test_adapter_directory_is_merged(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_llama)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # non-zero so the merge changes the weights
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_llama)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))

    merged = load_model(adapter)
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert load_tokenizer(adapter).vocab_size == load_tokenizer(tiny_llama).vocab_size


def _pickled_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    torch.save(load_model(src).state_dict(), dst / "pytorch_model.bin")
    return dst


def test_pickled_weights_need_allow_pickle(tiny_llama, tmp_path):
    pickled = _pickled_copy(tiny_llama, tmp_path / "pickled")
    with pytest.raises(UsageError, match="--allow-pickle"):
        load_model(pickled)
    assert _same_weights(load_model(pickled, allow_pickle=True), load_model(tiny_llama))


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_not_executed(tiny_llama, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(tiny_llama / "config.json", evil / "config.json")
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Exploit(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(UsageError):
        load_model(evil)
    with pytest.raises(UndoError):
        load_model(evil, allow_pickle=True)  # weights_only=True refuses the payload
    assert not marker.exists()


@pytest.mark.parametrize("case", ["missing", "file", "no_config", "bad_config", "no_weights",
                                  "corrupt_weights"])
def test_bad_checkpoints_are_refused_with_a_message(case, tiny_llama, tmp_path):
    path = tmp_path / "ckpt"
    if case == "file":
        path.write_text("x")
    elif case != "missing":
        shutil.copytree(tiny_llama, path)
        if case == "no_config":
            (path / "config.json").unlink()
        elif case == "bad_config":
            (path / "config.json").write_text("{not json")
        elif case == "no_weights":
            (path / "model.safetensors").unlink()
        elif case == "corrupt_weights":
            (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(UndoError) as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_custom_code_needs_trust_remote_code(tiny_llama, tmp_path):
    path = tmp_path / "remote"
    shutil.copytree(tiny_llama, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "evil"
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "executed"
    (path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(UndoError, match="trust-remote-code"):
        load_model(path)
    assert not marker.exists()


# ---------------------------------------------------------------- atomic output


def test_atomic_output_renames_on_success(tmp_path):
    out = tmp_path / "a" / "out"
    with atomic_output(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.undo-tmp-")
        (tmp / "f.txt").write_text("hi")
        assert not out.exists()
    assert (out / "f.txt").read_text() == "hi"
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("boom")
    assert not out.exists()
    assert not (tmp_path / "new").exists()  # parents it created are removed too


def test_atomic_output_maps_disk_full_to_a_clear_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UndoError, match="no space left"), atomic_output(out):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UsageError, match="--overwrite"), atomic_output(out):
        pass
    assert (out / "old.txt").exists()
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output(empty) as tmp:  # an empty directory may be reused
        (tmp / "x").write_text("x")
    assert (empty / "x").exists()


@pytest.mark.parametrize("spelling", [".", "..", "ABSOLUTE", "ABSOLUTE/..", "sub/.."])
def test_the_working_directory_is_not_an_output(spelling, cli, tmp_path, monkeypatch):
    # `undo init . --overwrite` died with "OSError: [Errno 16] Device or resource busy" (and
    # with an absolute path, replaced the directory the shell stands in): refused, exit 2,
    # nothing written or removed.
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work)
    out = spelling.replace("ABSOLUTE", str(work))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = cli("init", out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert "working directory" in result.stderr or "by its name" in result.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert Path.cwd() == work and (work / "keep.txt").read_text() == "keep"
    with atomic_output(work / "sub" / "new") as tmp:  # a new directory below it is fine
        (tmp / "x").write_text("x")
    assert (work / "sub" / "new" / "x").exists()


def test_output_may_not_overlap_inputs(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="inside input"), atomic_output(
        tiny_llama / "sub", inputs=[tiny_llama]
    ):
        pass
    with pytest.raises(UsageError, match="contains input"), atomic_output(
        tiny_llama.parent, inputs=[tiny_llama], overwrite=True
    ):
        pass
    assert (tiny_llama / "model.safetensors").is_file()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    stale = tmp_path / ".out.undo-tmp-999999999-abcd"
    stale.mkdir()
    with atomic_output(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists()


def test_copy_support_files_skips_weights_and_manifests(tiny_llama, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    (src / "undo.json").write_text("{}")
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_support_files(src, dst)
    names = sorted(p.name for p in dst.iterdir())
    assert "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith(".safetensors") or n == "undo.json" for n in names)


# ---------------------------------------------------------------- manifest


def test_fingerprint_follows_content_not_location(tiny_llama, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert fingerprint(copy) == fingerprint(tiny_llama)
    (copy / "tokenizer_config.json").write_text("{}")  # not part of the weights
    assert fingerprint(copy) == fingerprint(tiny_llama)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint(copy) != fingerprint(tiny_llama)


def test_fingerprint_is_blake3_of_names_and_bytes(tiny_llama, tmp_path, monkeypatch):
    """The definition, computed independently: BLAKE3 over name + NUL + bytes of config.json
    and the weight files in sorted order (here with files larger than one hashing window)."""
    from blake3 import blake3

    from undo_cli.checkpoint import manifest

    monkeypatch.setattr(manifest, "_HASH_WINDOW", 4096)
    names = sorted(["config.json", *(p.name for p in tiny_llama.glob("*.safetensors"))])
    expected = blake3()
    for name in names:
        expected.update(name.encode() + b"\0" + (tiny_llama / name).read_bytes())
    assert fingerprint(tiny_llama) == "blake3:" + expected.hexdigest()


def test_manifest_chain_tells_the_whole_history(tiny_llama, tmp_path):
    first = tmp_path / "first"
    shutil.copytree(tiny_llama, first)
    write_manifest(first, build_manifest("init", arguments={"arch": "llama"}, seed=3))
    second = tmp_path / "second"
    shutil.copytree(first, second)
    m2 = build_manifest("perturb", arguments={"alpha": 0.6}, parents={"input": first}, seed=1,
                        wall_time_s=0.5, compute={"tokens": 0, "flops": 0.0})
    write_manifest(second, m2)
    m3 = build_manifest("distill", arguments={}, parents={"teacher": first, "student": second},
                        metrics={"retain": {"loss": 1.0}})
    parents = {p["role"]: p for p in m3["parents"]}
    assert parents["student"]["fingerprint"] == fingerprint(second)
    assert parents["student"]["manifest"]["parents"][0]["manifest"]["stage"] == "init"
    assert [m["stage"] for m in manifest_history(m3)] == ["init", "perturb", "distill"]
    assert read_manifest(second)["arguments"] == {"alpha": 0.6}
    json.dumps(m3)  # serialisable


# ------------------------------------------------------------- checkpoints as users have them


def test_adapter_with_a_hub_base_needs_base_model_and_trains(hub_adapter, tiny_llama):
    """A real adapter names a hub model as its base: refused with a hint, loaded with
    --base-model, merged exactly as peft merges it, and every weight trainable."""
    from peft import PeftModel

    with pytest.raises(UsageError, match="--base-model"):
        inspect_checkpoint(hub_adapter)
    info = inspect_checkpoint(hub_adapter, base_model=tiny_llama)
    assert info.kind == "adapter" and info.base.path == tiny_llama
    merged = load_model(hub_adapter, base_model=tiny_llama)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                          str(hub_adapter)).merge_and_unload()
    assert _same_weights(merged, reference)
    assert not _same_weights(merged, AutoModelForCausalLM.from_pretrained(tiny_llama))
    assert all(p.requires_grad for p in merged.parameters())
    with pytest.raises(UsageError, match="--base-model .* not a directory"):
        inspect_checkpoint(hub_adapter, base_model=tiny_llama / "missing")


def test_stored_dtype_and_shards_are_read_from_the_headers(bf16_llama, sharded_qwen2,
                                                           tiny_llama, hub_adapter):
    from safetensors import safe_open

    assert inspect_checkpoint(bf16_llama).stored_dtype() == "bfloat16"
    assert inspect_checkpoint(tiny_llama).stored_dtype() == "float32"
    assert inspect_checkpoint(hub_adapter, base_model=bf16_llama).stored_dtype() == "bfloat16"
    assert inspect_checkpoint(tiny_llama).largest_shard_bytes() is None
    files = sorted(sharded_qwen2.glob("*.safetensors"))
    sizes = []
    for f in files:
        with safe_open(f, "pt") as st:
            sizes.append(sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size()
                             for k in st.keys()))  # noqa: SIM118 - not a dict
    assert len(files) > 1
    assert inspect_checkpoint(sharded_qwen2).largest_shard_bytes() == max(sizes)


def test_save_layout_keeps_the_input_unless_told(bf16_llama, sharded_qwen2, tiny_llama):
    from undo_cli.checkpoint import save_layout
    from undo_cli.checkpoint.output import ONE_FILE
    from undo_cli.options import SaveOptions

    assert save_layout(source=inspect_checkpoint(bf16_llama)) == Layout("bfloat16", ONE_FILE)
    assert save_layout(source=None) == Layout("float32", ONE_FILE)
    assert save_layout(SaveOptions(save_dtype="float16", max_shard_size="1MB"),
                       inspect_checkpoint(tiny_llama)) == Layout("float16", 1_000_000)
    info = inspect_checkpoint(sharded_qwen2)
    assert save_layout(source=info) == Layout("float32", info.largest_shard_bytes())
    assert (save_layout(SaveOptions(save_dtype="bfloat16"), info).max_shard_size
            == info.largest_shard_bytes() // 2)
    with pytest.raises(UsageError, match="--max-shard-size"):
        save_layout(SaveOptions(max_shard_size="lots"), info)


def test_save_model_writes_the_layout_without_changing_the_model(gpt2_bpe, sharded_qwen2,
                                                                 tmp_path):
    """bf16 out of an fp32 model, tied embeddings kept tied, shards as the input's; the model
    in memory is left in fp32."""
    from safetensors import safe_open

    from undo_cli.checkpoint import save_layout

    model, tok = load_model(gpt2_bpe), load_tokenizer(gpt2_bpe)
    save_model(model, tok, tmp_path / "bf16", layout=Layout("bfloat16"))
    assert model.dtype == torch.float32
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
        assert "lm_head.weight" not in set(f.keys())  # tied: stored once  # noqa: SIM118
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(reloaded.transformer.wte.weight.float(),
                               model.transformer.wte.weight.to(torch.bfloat16).float())

    info = inspect_checkpoint(sharded_qwen2)
    save_model(load_model(sharded_qwen2), None, tmp_path / "q", layout=save_layout(source=info))
    assert (sorted(p.name for p in (tmp_path / "q").glob("*.safetensors"))
            == sorted(p.name for p in sharded_qwen2.glob("*.safetensors")))


def test_an_adapters_model_card_is_not_carried(hub_adapter, tmp_path):
    (tmp_path / "out").mkdir()
    copy_support_files(hub_adapter, tmp_path / "out")
    assert not (tmp_path / "out" / "README.md").exists()
    assert not (tmp_path / "out" / "adapter_config.json").exists()


@pytest.fixture()
def umask():
    """Set the process's umask for one test, restored after it."""
    import os

    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=["022", "027", "077"])
def test_weight_files_follow_the_umask(umask, mask, tiny_llama, sharded_qwen2, tmp_path):
    # safetensors writes its files with 0600 whatever the umask: a checkpoint teammates and
    # CI users could not read. Every weight file undo writes gets 0666 less the umask, as
    # config.json has; so do the weights of a training state.
    from undo_cli.engine.state_files import save_rank

    umask(mask)
    expected = 0o666 & ~mask
    model = AutoModelForCausalLM.from_pretrained(sharded_qwen2)
    with atomic_output(tmp_path / "out") as tmp:
        save_model(model, None, tmp, source=sharded_qwen2,
                   layout=Layout("float32", 20_000))
    written = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(written) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    for path in [*written, tmp_path / "out" / "config.json"]:
        assert path.stat().st_mode & 0o777 == expected, path
    state = tmp_path / "state"
    state.mkdir()
    linear = torch.nn.Linear(3, 2)
    save_rank(state, 0, model=linear, optimizer=torch.optim.SGD(linear.parameters(), lr=0.1),
              run={"step": 1}, with_weights=True)
    assert {p.stat().st_mode & 0o777 for p in state.iterdir()} == {expected}
