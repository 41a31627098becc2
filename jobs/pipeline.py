"""Ray job entry point: the whole recipe and its baselines, the same as ``deepomni pipeline`` (`make demo`).

    ray job submit --working-dir . -- python -m jobs.pipeline --out /shared/pipeline --config train-gpu.json
"""

import sys

from deepomni.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
