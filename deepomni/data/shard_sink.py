"""The writer of tokenized shards (their layout: :mod:`deepomni.data.tokenized`), a Ray Data datasink.

Ray Data's ``write_parquet`` hands each write task's rows to ``pyarrow.dataset.write_dataset`` with threads and
without its ``preserve_order``: the rows of a file come out in another order each run, and so does every batch
that training draws from them. This sink writes a task's rows in the order they arrive (``deepomni data
prepare`` runs its pipeline with ``preserve_order``), one file per partition a task, named by the task's index:
the same corpus prepared twice is the same files, row for row. A retried task rewrites its own files (a file
appears whole, renamed into place).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from functools import reduce
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor


class ShardSink(Datasink[None]):
    """Hive-partitioned Parquet under ``path`` (``<col>=<value>/.../part-<task>.parquet`` for
    ``partition_cols``; the partition columns live in the directory names, not in the files), each write task
    given at least ``min_rows_per_file`` rows (fewer in the last), row groups of that many rows."""

    def __init__(self, path: str | Path, partition_cols: Sequence[str], min_rows_per_file: int):
        self.path, self.partition_cols = Path(path), list(partition_cols)
        self.min_rows_per_file = min_rows_per_file

    @property
    def min_rows_per_write(self) -> int:
        return self.min_rows_per_file

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # overwrite: nothing of an earlier write stays
        self.path.mkdir(parents=True)

    def write(self, blocks: Iterable, ctx) -> None:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return
        table = pa.concat_tables(tables)
        keys = list(zip(*(table.column(c).to_pylist() for c in self.partition_cols)))
        for key in dict.fromkeys(keys):  # partitions in order of first appearance; rows keep their order
            rows = table.filter(reduce(pc.and_, (pc.equal(table.column(c), v) for c, v in zip(self.partition_cols, key))))
            out = self.path.joinpath(*(f"{c}={v}" for c, v in zip(self.partition_cols, key)))
            out.mkdir(parents=True, exist_ok=True)
            name = f"part-{ctx.task_idx:05d}.parquet"
            tmp = out / f".{name}.tmp"  # hidden from readers (a leading dot) until renamed
            pq.write_table(rows.drop_columns(self.partition_cols), tmp, row_group_size=self.min_rows_per_file)
            os.replace(tmp, out / name)

    def get_name(self) -> str:
        return "TokenizedShards"
