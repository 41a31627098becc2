"""Ray job entry point: evaluate a checkpoint, the same as ``deepomni evaluate`` (docs/train.md).

    ray job submit --working-dir . -- python -m jobs.evaluate --checkpoint ckpt/s3 --data data --out eval/s3
"""

import sys

from deepomni.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
