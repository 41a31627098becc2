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
    import deepomni.checkpoint

    d = save_model(tiny_model, tmp_path / "ck")
    before = _weights(d)

    def half_then_fail(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError("disk full")

    monkeypatch.setattr(deepomni.checkpoint, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_model(DeepOmniModel(tiny_model.cfg).init_weights(seed=1), d)
    after = _weights(d)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    load_model(d)
    assert _hidden(tmp_path) == []


KILLED_WRITER = """
import os, sys, time
import deepomni.checkpoint as ck
from deepomni.config import load_preset
from deepomni.model.model import DeepOmniModel

def slow_save_file(state, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"\\0" * 4096)  # a partial safetensors file
        f.flush()
    open(sys.argv[2], "w").close()  # tell the parent we are mid-write
    time.sleep(600)

ck.save_file = slow_save_file
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
    assert (leftovers[0] / "model.safetensors").stat().st_size == 4096  # the half-written file
    if not existing:
        assert not d.exists()
        return
    after = _weights(d)
    assert all(torch.equal(after[k], before[k]) for k in before)
    model, _ = load_model(d)
    torch.testing.assert_close(model.state_dict(), tiny_model.state_dict(), rtol=0, atol=0)
