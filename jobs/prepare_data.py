"""Preprocess raw items into tokenized training shards on Ray Data.

    python -m jobs.prepare_data --raw data/raw --out data [--preset tiny] [--codec builtin] ...
    ray job submit --working-dir . -- python -m jobs.prepare_data --raw /shared/raw --out /shared/data

Runs on the cluster named by RAY_ADDRESS (as under ``ray job submit``), else on an embedded local Ray.
Same as ``deepomni data prepare``.
"""

from __future__ import annotations

import sys

from deepomni.data.cli import prepare_main

if __name__ == "__main__":
    sys.exit(prepare_main())
