"""Ray job entry point: sample, judge and pair spoken answers for the DPO stage, the same as ``deepomni pairs``.

    ray job submit --working-dir . -- python -m jobs.pairs --checkpoint runs/s3_joint/final --data data --out pairs
"""

import sys

from deepomni.cli import main

if __name__ == "__main__":
    sys.exit(main(["pairs", *sys.argv[1:]]))
