"""Training faults (issue 13, point 4): a SIGKILLed Ray Train worker resumes from the latest checkpoint with
the data stream where that checkpoint left it, so the steps after it see the same samples and give the same
losses as an uninterrupted run; a worker SIGKILLed while it copies a checkpoint to storage leaves the
previous checkpoint the one a resume reads.

One faulty run covers both (the kill lands in a checkpoint's copy, mid-stage), against one uninterrupted
reference run (module fixture), through the per-step sample log: tiny runs, 10 synthetic text rows, batch 2
(5 steps an epoch), 8 steps, a checkpoint every 2. The data position logic itself: :class:`DataStream`
tests, no Ray."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from deepomni.train.config import FaultInjection, TrainConfig
from deepomni.train.fault_injection import HELD_WORKER
from deepomni.train.loop import DataStream, resume_position
from tests.helpers.train import last_per_step, registered_steps, sample_log

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

N_ROWS, BATCH, STEPS, EVERY = 10, 2, 8, 2
C = 5  # channels of the tiny preset (text + 4 codec)


def _rows() -> list[dict]:
    """Tokenized-format text rows (``deepomni.data.tokenized``), distinct ids, fixed content."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(N_ROWS):
        L = 6 + i % 4
        tokens = torch.randint(0, 200, (L, C), generator=g)
        rows.append({"id": f"s{i:02d}", "task": "text_qa", "input_modality": "text", "length": L,
                     "num_channels": C, "tokens": tokens.reshape(-1).tolist(),
                     "labels": tokens.reshape(-1).tolist(), "audio_positions": 0, "mel": [], "mel_bins": 0,
                     "mel_frames": 0})
    return rows


def _dataset():
    import ray.data

    return ray.data.from_items(_rows())  # several blocks: the split's order matters


def _cfg(tmp: Path, run: str, **kw) -> TrainConfig:
    base = dict(run_name=run, storage_path=str(tmp), stage="text_pretrain", preset="tiny", batch_size=BATCH,
                max_steps=STEPS, checkpoint_every=EVERY, lr=3e-3, seed=0, log_every=1, cpus_per_worker=1.0,
                sample_log=True)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _seen(r: dict) -> tuple:
    """What a step record says was trained on and what it gave (not when)."""
    return r["step"], r["epoch"], r["ids"], r["loss"]


def _assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    ref, got = last_per_step(sample_log(reference)), last_per_step(sample_log(run_dir))
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for s in ref:
        assert got[s]["ids"] == ref[s]["ids"], (s, got[s]["ids"], ref[s]["ids"])
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])  # bit-identical
    # the multiset of samples seen: as often as in the uninterrupted run
    assert sorted(i for r in got.values() for i in r["ids"]) == sorted(i for r in ref.values() for i in r["ids"])
    a = load_file(str(reference / "final" / "model.safetensors"))
    b = load_file(str(run_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local) -> Path:
    """An uninterrupted run: its sample log and final weights are what a resumed run must reproduce."""
    from deepomni.train.loop import fit

    tmp = tmp_path_factory.mktemp("faults")
    r = fit(_cfg(tmp, "reference", checkpoint_every=0), _dataset(), progress=False)  # no checkpoint until the end
    assert r.error is None, r.error
    assert r.metrics["step"] == STEPS and r.metrics["start_step"] == 0
    run_dir = tmp / "reference"
    log = sample_log(run_dir)
    assert [x["step"] for x in log] == list(range(1, STEPS + 1))  # no failure, no step twice
    ids = [i for x in log for i in x["ids"]]
    per_epoch = N_ROWS // BATCH
    assert sorted(ids[:N_ROWS]) == [f"s{i:02d}" for i in range(N_ROWS)]  # epoch 0: every row once
    assert ids[N_ROWS:] == ids[:len(ids) - N_ROWS]  # epoch 1: the same order again
    assert [x["epoch"] for x in log] == [s // per_epoch for s in range(STEPS)]
    return run_dir


# ------------------------------------------------------------------------------------- no Ray needed
class _Shard:
    """``DataIterator.iter_batches`` over fixed rows: pyarrow batches of ``batch_size``, the last one short."""

    def __init__(self, n: int):
        self.rows = [{"id": f"r{i}", "x": i} for i in range(n)]

    def iter_batches(self, batch_size: int, batch_format: str):
        assert batch_format == "pyarrow"
        for i in range(0, len(self.rows), batch_size):
            yield pa.Table.from_pylist(self.rows[i:i + batch_size])


@pytest.mark.parametrize("n,batch", [(10, 2), (7, 3), (4, 4)])
def test_data_stream_resumes_where_the_position_says(n, batch):
    """From the position after any number of batches (mid-epoch, at an epoch's end, a short last batch),
    a new stream yields exactly the batches the uninterrupted one yields next."""
    steps = 3 * -(-n // batch) + 1  # three epochs and a bit
    whole = DataStream(_Shard(n), batch)
    batches, positions = [], []
    for _ in range(steps):
        batches.append([r["id"] for r in next(whole)])
        positions.append(whole.position())
    assert positions[-1]["epoch"] == 3
    for k in range(steps - 1):
        pos = positions[k]
        resumed = DataStream(_Shard(n), batch, 0, *resume_position({"data": [pos]}, 0, 1))
        rest = [[r["id"] for r in next(resumed)] for _ in range(steps - 1 - k)]
        assert rest == batches[k + 1:], (k, pos)
        assert resumed.position() == positions[-1]


def test_resume_position_of_other_checkpoints():
    assert resume_position(None, 0, 1) == (0, 0)
    assert resume_position({"step": 4, "stage": "x"}, 0, 1) == (0, 0)  # written before data positions
    state = {"data": [{"epoch": 2, "rows": 6}, {"epoch": 2, "rows": 6}]}
    assert resume_position(state, 1, 2) == (2, 6)
    assert resume_position(state, 0, 4) == (2, 3)  # other worker count: the same fraction of the epoch


def test_fault_options():
    from tests.helpers.train import parse_train

    cfg = parse_train(["--sample-log", "true", "--inject-fault", '{"at_step": 3, "where": "checkpoint", "mode": "kill"}'])
    assert cfg.sample_log is True and cfg.inject_fault == FaultInjection(at_step=3, where="checkpoint", mode="kill")
    assert TrainConfig().sample_log is False and TrainConfig().inject_fault is None  # off by default
    with pytest.raises(ValueError, match="inject_fault.mode"):
        TrainConfig.from_dict({"inject_fault": {"at_step": 1, "mode": "explode"}})
    with pytest.raises(ValueError, match="inject_fault.where"):
        TrainConfig.from_dict({"inject_fault": {"at_step": 1, "where": "forward"}})


# ----------------------------------------------------------------------------------- Ray Train runs
def _kill_when_held(run_dir: Path, killed: dict, after: int, timeout_s: float = 300) -> None:
    """Wait for the worker's pid announcement (``fail_mode="hold"``) and for the controller to have
    registered the step-``after`` checkpoint (it polls the workers' reports: a worker killed before the
    poll loses its last report, and the run would resume from the checkpoint before), check the pid is a
    Ray worker process, SIGKILL it; what was killed, and when, goes into ``killed``."""
    held, deadline = run_dir / HELD_WORKER, time.monotonic() + timeout_s
    while not held.exists() or after not in registered_steps(run_dir):
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)
    info = json.loads(held.read_text())
    cmdline = Path(f"/proc/{info['pid']}/cmdline").read_bytes()
    if not cmdline.startswith(b"ray::"):  # only ever a Ray worker (the train worker's process title)
        killed["refused"] = cmdline
        return
    os.kill(info["pid"], signal.SIGKILL)
    killed.update(info, time=time.time(), title=cmdline.split(b"\0")[0].decode())


def test_sigkilled_worker_resumes_exactly(tmp_path, reference):
    """Rank 0's Ray Train worker process is SIGKILLed from this test half way through copying the step-6
    checkpoint to storage (the worker copies half of its bytes, announces its pid and waits: the kill lands
    at a fixed point). Ray Train never registers the half-copied directory; the run restarts from the step-4
    checkpoint (epoch 0, 8 of 10 rows consumed), which loads, re-runs steps 5-8 across the epoch boundary
    with the same samples and the same losses, and ends with the uninterrupted run's samples, losses and
    weights (bit-identical)."""
    from deepomni.checkpoint import load_model
    from deepomni.train.loop import fit

    run_dir = tmp_path / "killed"
    killed: dict = {}
    t = threading.Thread(target=_kill_when_held, args=(run_dir, killed, 4), daemon=True)
    t.start()
    r = fit(_cfg(tmp_path, "killed", max_failures=1,
                 inject_fault={"at_step": 6, "where": "checkpoint", "mode": "hold"}),
            _dataset(), progress=False)
    t.join(timeout=5)
    assert killed.get("step") == 6, killed
    assert r.error is None, r.error
    assert r.metrics["step"] == STEPS and r.metrics["start_step"] == 4  # resumed from the step-4 checkpoint

    # the checkpoints: the half-copied one is on disk but was never registered; the one before loads
    registered = {Path(c.path).name: m["step"] for c, m in r.best_checkpoints}
    assert sorted(registered.values()) == [2, 4, 6, 8]  # step 6's from the re-run
    on_disk = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    partial = [n for n in on_disk if n not in registered]
    assert len(partial) == 1 and len(on_disk) == 5, on_disk
    assert not (run_dir / partial[0] / "train_state.json").exists()  # the copy stopped half way
    copied = sum(f.stat().st_size for f in (run_dir / partial[0]).rglob("*") if f.is_file())
    before = next(Path(c.path) for c, m in r.best_checkpoints if m["step"] == 4)
    whole = sum(f.stat().st_size for f in before.rglob("*") if f.is_file())
    assert 0 < copied < whole
    assert json.loads((before / "train_state.json").read_text())["data"] == [{"epoch": 0, "rows": 8}]
    load_model(before / "model")

    # the samples and losses
    log = sample_log(run_dir)
    assert [x["step"] for x in log] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # 5 and 6 ran, were lost, ran again
    assert [x["epoch"] for x in log[6:]] == [0, 1, 1, 1]  # the re-run crosses into epoch 1
    assert list(map(_seen, log[4:6])) == list(map(_seen, log[6:8]))  # same samples, same loss at step 5
    _assert_same_as_reference(run_dir, reference)
    print(f"\n[faults] SIGKILL of {killed['title']} (pid {killed['pid']}) in the step-6 checkpoint copy "
          f"({copied / 2**20:.1f} of {whole / 2**20:.1f} MiB) -> step 5 re-run after "
          f"{log[6]['time'] - killed['time']:.1f} s; the run took {log[-1]['time'] - log[0]['time']:.1f} s "
          f"from its first step (reference: "
          f"{sample_log(reference)[-1]['time'] - sample_log(reference)[0]['time']:.1f} s)")
