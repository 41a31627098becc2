"""Fault injection for the training job (``TrainConfig.inject_fault``, a :class:`~deepomni.train.config.FaultInjection`): the tests
that kill a worker in the middle of a step or of a checkpoint upload (``tests/test_train_faults.py``) and check
that the run resumes from the last complete checkpoint (``deepomni.train.loop``'s module doc).

The failure happens once per run, on rank 0, at step ``at_step`` of ``where`` ("step": before the
step; "checkpoint": half way through the checkpoint's upload); a marker file in the run directory remembers
it across the restarted worker group.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

HELD_WORKER = ".held_worker"  # mode "hold": the waiting worker's pid, for a test to kill
HOLD_S = 300.0
FAILED_ONCE = ".failed_once"  # in the run directory: the failure has happened


def fail(mode: str, step: int, held_file: Path) -> None:
    """The injected failure (``FaultInjection.mode``): raise, SIGKILL this process, or announce this
    process's pid in ``held_file`` and wait for someone to SIGKILL it ("hold")."""
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hold":
        tmp = held_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "step": step}))
        tmp.replace(held_file)
        time.sleep(HOLD_S)
        raise RuntimeError(f"mode=hold: nobody killed worker {os.getpid()} within {HOLD_S:.0f} s")
    raise RuntimeError(f"injected failure at step {step} (TrainConfig.inject_fault)")


def copy_half_then_fail(dest_root: str, then) -> object:
    """A ``checkpoint_upload_fn`` (``where="checkpoint"``): copies the checkpoint's files where Ray Train
    would (``<experiment>/<checkpoint_dir_name>``) until half of their bytes are written, the file at the
    half-way point partly, then ``then()`` (the failure): a worker lost in the middle of the upload."""

    def upload(checkpoint, checkpoint_dir_name: str):
        src, dst = Path(checkpoint.path), Path(dest_root) / checkpoint_dir_name
        files = sorted(p for p in src.rglob("*") if p.is_file())
        budget = sum(p.stat().st_size for p in files) // 2
        for f in files:
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            data = f.read_bytes()
            out.write_bytes(data[:budget])
            budget -= len(data)
            if budget <= 0:
                break
        then()

    return upload


class FaultInjector:
    """The configured failure of one worker: :meth:`due` says whether it happens here and now (and then
    records that it did), :meth:`fail` makes it happen."""

    def __init__(self, cfg, rank: int, run_dir: Path):
        self.cfg, self.rank = cfg, rank
        self.marker, self.held_file = run_dir / FAILED_ONCE, run_dir / HELD_WORKER

    def due(self, where: str, step: int) -> bool:
        """Whether the configured failure happens at ``where`` of ``step`` (rank 0, once per run)."""
        f = self.cfg.inject_fault
        if f is None or step != f.at_step or self.rank != 0 or f.where != where or self.marker.exists():
            return False
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.touch()
        return True

    def fail(self, step: int) -> None:
        fail(self.cfg.inject_fault.mode, step, self.held_file)

    def upload_then_fail(self, dest_root: str, step: int):
        """The ``checkpoint_upload_fn`` that copies half of the checkpoint, then fails."""
        return copy_half_then_fail(dest_root, lambda: self.fail(step))
