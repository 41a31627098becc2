import pytest
import torch

from deepomni.checkpoint import load_model, save_model
from deepomni.model.modality import ExpertAssignment
from deepomni.model.model import DeepOmniModel


def test_roundtrip_with_assignment(tmp_path, tiny_model):
    a = ExpertAssignment(tiny_model.cfg.n_routed_experts, {l: [0, 1, 2, 3, 4] for l in range(1, 4)})
    save_model(tiny_model, tmp_path / "ck", a)
    model, b = load_model(tmp_path / "ck")
    assert b == a
    tok = torch.randint(0, 50, (1, 6, tiny_model.layout.num_channels))
    torch.testing.assert_close(model(tok).logits[0], tiny_model(tok).logits[0])


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path)


# ------------------------------------------------------------------------------------ atomic writes
def _weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-away"])
def test_save_over_an_existing_checkpoint(tmp_path, tiny_model, monkeypatch, exchange):
    """A save replaces the directory as a whole: a stale experts.json goes, foreign files stay, nothing
    temporary is left beside it (with the atomic swap and with the rename-away fallback)."""
    import deepomni.atomic

    if not exchange:
        monkeypatch.setattr(deepomni.atomic, "_exchange", lambda a, b: False)
    a = ExpertAssignment(tiny_model.cfg.n_routed_experts, {l: [0, 1] for l in range(1, 4)})
    d = save_model(tiny_model, tmp_path / "ck", a)
    (d / "notes.txt").write_text("mine")
    (d / "sub").mkdir()
    (d / "sub" / "x").write_text("y")
    other = DeepOmniModel(tiny_model.cfg).init_weights(seed=1)
    save_model(other, d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "sub"]
    assert (d / "notes.txt").read_text() == "mine" and (d / "sub" / "x").read_text() == "y"
    model, assignment = load_model(d)
    assert assignment is None
    torch.testing.assert_close(model.state_dict(), other.state_dict(), rtol=0, atol=0)
    assert _hidden(tmp_path) == []


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    """The weights' write fails half way: the previous checkpoint is untouched and loads, and the partial
    write is removed."""
    import safetensors.torch

    d = save_model(tiny_model, tmp_path / "ck")
    before = _weights(d)

    def half_then_fail(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_model(DeepOmniModel(tiny_model.cfg).init_weights(seed=1), d)
    after = _weights(d)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    load_model(d)
    assert _hidden(tmp_path) == []


KILLED_WRITER = """
import os, sys, time
import safetensors.torch
import deepomni.checkpoint as ck
from deepomni.config import load_preset
from deepomni.model.model import DeepOmniModel

def slow_save_file(state, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"\\0" * 4096)  # a partial safetensors file
        f.flush()
    open(sys.argv[2], "w").close()  # tell the parent we are mid-write
    time.sleep(600)

safetensors.torch.save_file = slow_save_file
ck.save_model(DeepOmniModel(load_preset("tiny")).init_weights(seed=1), sys.argv[1])
"""


@pytest.mark.parametrize("existing", [True, False], ids=["over-previous", "first"])
def test_killed_writer_leaves_the_previous_checkpoint(tmp_path, tiny_model, existing):
    """SIGKILL while model.safetensors is half written: the directory a loader reads holds the previous
    complete checkpoint (or does not exist); the partial write is only in a hidden temporary sibling."""
    import signal
    import subprocess
    import sys
    import time

    d = tmp_path / "final"
    if existing:
        save_model(tiny_model, d)
        before = _weights(d)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(d), str(ready)])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "the writer exited before the write"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = [tmp_path / n for n in _hidden(tmp_path)]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".final.tmp-")
    partial = list(leftovers[0].glob("*.safetensors"))  # the half-written file (written under a shard's temporary name)
    assert len(partial) == 1 and partial[0].stat().st_size == 4096
    if not existing:
        assert not d.exists()
        return
    after = _weights(d)
    assert all(torch.equal(after[k], before[k]) for k in before)
    model, _ = load_model(d)
    torch.testing.assert_close(model.state_dict(), tiny_model.state_dict(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ parts and shards
def _state(module):
    return {k: v for k, v in module.state_dict().items()}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_each_part_loads_exactly_its_tensors(tmp_path, tiny_model, layout):
    """The speech part holds the encoder + projector, the backbone part everything else, the model both: names,
    count and values, from a single file and from shards + index."""
    from deepomni.checkpoint import load_part
    from deepomni.model.speech import SpeechInput

    d = save_model(tiny_model, tmp_path / "ck", max_shard_bytes=2**30 if layout == "single" else 2**18)
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    if layout == "sharded":
        assert (d / "model.safetensors.index.json").is_file() and len(shards) > 2
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    else:
        assert shards == ["model.safetensors"] and not (d / "model.safetensors.index.json").exists()
    full = _state(tiny_model)
    speech = load_part(d, "speech")
    backbone = load_part(d, "backbone")
    assert isinstance(speech, SpeechInput) and backbone.speech is None
    want_speech = {k.removeprefix("speech."): v for k, v in full.items() if k.startswith("speech.")}
    want_backbone = {k: v for k, v in full.items() if not k.startswith("speech.")}
    for got, want in ((_state(speech), want_speech), (_state(backbone), want_backbone),
                      (_state(load_model(d)[0]), full)):
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    n_speech = sum(p.numel() for p in speech.parameters())
    n_backbone = sum(p.numel() for p in backbone.parameters())
    assert n_speech + n_backbone == sum(p.numel() for p in tiny_model.parameters())
    assert not any(p.is_meta for p in [*speech.parameters(), *backbone.buffers()])
    tok = torch.randint(0, 50, (1, 6, tiny_model.layout.num_channels))
    torch.testing.assert_close(backbone(tok).logits[0], tiny_model(tok).logits[0])


def test_part_in_a_dtype(tmp_path, tiny_model):
    """bf16 on load: every floating-point weight is bf16 but the router's (fp32 as built), and a bf16 model saved
    as it is loads back bitwise."""
    from deepomni.checkpoint import load_part

    d = save_model(tiny_model, tmp_path / "ck")
    b16 = load_part(d, "backbone", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in b16.named_parameters()}
    assert {n for n, t in dtypes.items() if t == torch.float32} == {n for n in dtypes if n.endswith("gate.weight")}
    assert all(t in (torch.bfloat16, torch.float32) for t in dtypes.values())
    again = load_part(save_model(b16, tmp_path / "b16"), "backbone", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(_state(again).values(), _state(b16).values()))


def test_part_errors(tmp_path, tiny_model):
    from deepomni.checkpoint import load_part

    d = save_model(tiny_model, tmp_path / "ck")
    with pytest.raises(ValueError, match="part must be one of"):
        load_part(d, "encoder")
    other = DeepOmniModel(tiny_model.cfg.replace(num_hidden_layers=tiny_model.cfg.num_hidden_layers - 1))
    save_model(other.init_weights(seed=0), tmp_path / "small")
    (tmp_path / "small" / "config.json").write_text((d / "config.json").read_text())  # config says more layers
    with pytest.raises(ValueError, match="missing .*layers"):
        load_part(tmp_path / "small", "backbone")
    index = '{"weight_map": {"embed.weight": "model-00001-of-00002.safetensors"}}'
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(FileNotFoundError, match="shards listed"):
        load_part(d, "speech")


def test_foundation_base_parts_agree():
    """A foundation set's base/ (encoder read from ../encoder, no projector: a seeded one): the speech part's
    encoder and projector are the whole model's, bit for bit."""
    from deepomni.checkpoint import load_part
    from deepomni.foundations import DEFAULT, base_dir

    base = base_dir(DEFAULT)
    model, _ = load_model(base)
    speech = load_part(base, "speech")
    want = {k.removeprefix("speech."): v for k, v in _state(model).items() if k.startswith("speech.")}
    got = _state(speech)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert any(k.startswith("projector.") for k in got) and any(k.startswith("encoder.ctc_head") for k in got)
