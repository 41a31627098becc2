"""Ray job entry point: one training stage, the same as ``deepomni train`` (docs/train.md).

    ray job submit --working-dir . -- python -m jobs.train --stage s1_align --config tiny \
        --init runs/base/final --run-name s1
"""

import sys

from deepomni.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
