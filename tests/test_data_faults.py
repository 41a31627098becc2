"""Data faults (issue 13, point 5): a Ray Data stage actor SIGKILLed in the middle of ``prepare``.

The reference is an unkilled run of the same three stages, called in-process on the same rows (as
``benchmarks/data_pipeline.py`` does): a second Ray run would double the test's time, mostly actor start-up.
The stage actors run with the opt-in trace of ``deepomni.data.pipeline`` (``DEEPOMNI_DATA_TRACE_DIR``): each
appends ``start`` / ``begin`` / ``end`` lines with its pid and the batch's first id, and waits a little inside
every batch, so the test can kill an actor's process while it is inside a batch and check afterwards that
the actor was restarted and that batch was run again.
"""

import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from deepomni.config import DataConfig, load_preset
from deepomni.data.pipeline import BATCH_DELAY_ENV, TRACE_DIR_ENV, CodecStage, FeatureStage, SequenceStage
from deepomni.data.schema import RAW_SCHEMA

pytestmark = [pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed"),
              pytest.mark.timeout(300)]

STAGE_CLASS = {"feature": "FeatureStage", "codec": "CodecStage"}
COMPARED = ("split", "task", "input_modality", "status", "error", "length", "tokens", "labels", "mel_frames",
            "audio_positions", "answer_frames")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # Ray Data 2.60 reads Parquet footers on a pool of 32 short-lived actors per read_parquet, ~2 s of CPU
    # each to start: one is plenty for four files (read in the driver when `prepare` builds its dataset)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    # address="local": a private instance even when a `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_local):
    """Raw items (one with bad audio), a small codec, and the rows an unkilled in-process run makes of them."""
    from deepomni.codec.builtin import fit_builtin_codec
    from deepomni.data.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("faults")
    synthesize(SynthConfig(seed=2, sizes={"train": 12, "validation": 2, "test": 2}, workers=2), out, progress=False)
    bad = pq.read_table(next((out / "raw" / "train").glob("*.parquet"))).slice(0, 1).to_pylist()[0]
    bad.update(id="bad-question", input_modality="speech", task="asr", question_audio=b"RIFF not really audio",
               question_seconds=1.0)
    pq.write_table(pa.Table.from_pylist([bad], schema=RAW_SCHEMA), out / "raw" / "train" / "part-bad.parquet")
    # 4 x 16 codes (the tiny preset takes <= 256): fits in a moment, unlike the default fit of `prepare`
    wav = np.sin(np.arange(16000 * 2) * 0.05).astype(np.float32)
    fit_builtin_codec([wav], num_channels=4, codebook_size=16, seed=0, progress=False).save(out / "codec")
    cfg = DataConfig(batch_size=4, codec=f"builtin:{out / 'codec'}")

    model_cfg = load_preset(cfg.preset).to_dict()
    stages = [FeatureStage(model_cfg, asdict(cfg)), CodecStage(cfg.codec, cfg.max_audio_seconds),
              SequenceStage(model_cfg, cfg.tokenizer)]
    table = pads.dataset(str(out / "raw"), format="parquet").to_table()
    rows = []
    for start in range(0, table.num_rows, cfg.batch_size):
        batch = table.slice(start, cfg.batch_size)
        for stage in stages:
            batch = stage(batch)
        rows += batch.to_pylist()
    return out / "raw", cfg, {r["id"]: r for r in rows}


def read_output(out: Path) -> dict:
    table = pads.dataset(str(out / "tokenized"), format="parquet", partitioning="hive").to_table()
    ids = table.column("id").to_pylist()
    dup = [i for i, n in Counter(ids).items() if n > 1]
    assert not dup, f"ids written more than once: {dup}"
    return {r["id"]: r for r in table.to_pylist()}


def read_trace(path: Path) -> list[tuple]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        event, stage, pid, first, rows, t = line.split(" ")
        out.append((event, stage, int(pid), first, int(rows), float(t)))
    return out


class Killer(threading.Thread):
    """SIGKILLs one actor of each stage in ``stages``, while it is inside its stage's ``nth`` batch (or later).

    Only processes named in the trace of this test's own run, and only if their command line is a Ray
    worker of that stage."""

    def __init__(self, trace: Path, stages: tuple[str, ...], nth: int = 2, timeout_s: float = 240.0):
        super().__init__(daemon=True)
        self.trace, self.stages, self.nth, self.deadline = trace, stages, nth, time.time() + timeout_s
        self.kills: dict[str, tuple] = {}  # stage -> (pid, first id of the interrupted batch, time)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self) -> None:
        while len(self.kills) < len(self.stages) and not self.stop.is_set() and time.time() < self.deadline:
            lines = read_trace(self.trace)
            ended = {(s, p, f) for e, s, p, f, _, _ in lines if e == "end"}
            for stage in self.stages:
                begins = [(p, f) for e, s, p, f, _, _ in lines if e == "begin" and s == stage]
                if stage in self.kills or len(begins) < self.nth or (stage, *begins[-1]) in ended:
                    continue
                pid, first = begins[-1]
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                assert cmdline.startswith("ray::") and STAGE_CLASS[stage] in cmdline, cmdline
                os.kill(pid, signal.SIGKILL)
                self.kills[stage] = (pid, first, time.time())
            time.sleep(0.02)


def test_a_killed_stage_actor_is_restarted_and_every_row_is_written_once(reference, tmp_path, monkeypatch):
    from deepomni.data.pipeline import prepare

    raw, cfg, ref_rows = reference
    input_ids = pads.dataset(str(raw), format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ref_rows) == sorted(input_ids) and len(input_ids) == 17
    assert [i for i, r in ref_rows.items() if r["status"] == "rejected"] == ["bad-question"]

    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv(TRACE_DIR_ENV, str(trace))
    monkeypatch.setenv(BATCH_DELAY_ENV, "0.25")
    killer = Killer(trace / "trace.log", ("feature", "codec"))
    killer.start()
    try:
        summary = prepare(raw, tmp_path / "run", cfg)
        finished = time.time()
    finally:
        killer.stop.set()
        killer.join()

    # the kills happened, inside a batch, before the run ended; each actor came back and redid that batch
    assert killer.error is None and set(killer.kills) == {"feature", "codec"}, (killer.error, killer.kills)
    lines = read_trace(trace / "trace.log")
    for stage, (pid, first, t_kill) in killer.kills.items():
        assert t_kill < finished
        assert ("end", stage, pid, first) not in {line[:4] for line in lines}  # interrupted mid-batch
        restarted = [line[2] for line in lines if line[:2] == ("start", stage) and line[5] > t_kill]
        assert restarted and pid not in restarted
        assert any(line[:2] == ("end", stage) and line[2] in restarted and line[3] == first for line in lines)

    # every input row exactly once (ok + rejected), the same rows and counts as the unkilled run's
    rows = read_output(tmp_path / "run")
    assert sorted(rows) == sorted(input_ids)
    per: dict = {}
    for r in ref_rows.values():
        per.setdefault(f"{r['split']}/{r['status']}", Counter())[r["task"]] += 1
    assert (summary.items, summary.rejected, summary.per_split_task) == (17, 1, per)
    for i, r in rows.items():
        assert {k: r[k] for k in COMPARED} == {k: ref_rows[i][k] for k in COMPARED}, i
        np.testing.assert_allclose(np.asarray(r["mel"], np.float32), np.asarray(ref_rows[i]["mel"], np.float32),
                                   atol=1e-2, err_msg=i)
    # and in the order they were read, though two batches ran twice (preserve_order, ShardSink)
    for part in {(r["split"], r["status"]) for r in ref_rows.values()}:
        assert [i for i, r in rows.items() if (r["split"], r["status"]) == part] == \
            [i for i, r in ref_rows.items() if (r["split"], r["status"]) == part], part
    assert not (tmp_path / "run" / "tokenized.partial").exists()


def test_an_actor_past_its_restarts_fails_the_run_and_keeps_the_previous_output(reference, tmp_path, monkeypatch):
    """``actor_max_restarts`` reaches Ray (its own default restarts forever): with 0, the kill ends the run."""
    import ray

    from deepomni.data.pipeline import prepare

    raw, cfg, _ = reference
    previous = tmp_path / "run" / "tokenized"
    previous.mkdir(parents=True)
    (previous / "kept.txt").write_text("the last good run")
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv(TRACE_DIR_ENV, str(trace))
    monkeypatch.setenv(BATCH_DELAY_ENV, "0.25")
    killer = Killer(trace / "trace.log", ("feature",), nth=1)
    killer.start()
    try:
        with pytest.raises(ray.exceptions.ActorDiedError):
            prepare(raw, tmp_path / "run", DataConfig(**{**asdict(cfg), "actor_max_restarts": 0}))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.error is None and set(killer.kills) == {"feature"}
    assert [p.name for p in previous.iterdir()] == ["kept.txt"]
    assert not (tmp_path / "run" / "tokenized.partial").exists()
