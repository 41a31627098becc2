"""Ray job entry point: tokenize raw items on Ray Data, the same as ``deepomni data prepare`` (docs/data.md).

    ray job submit --working-dir . -- python -m jobs.prepare_data --raw /shared/raw --out /shared/data
"""

import sys

from deepomni.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
