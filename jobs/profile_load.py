"""Ray job entry point: measure modality load and choose the speech experts, the same as ``deepomni profile``.

    ray job submit --working-dir . -- python -m jobs.profile_load --checkpoint ckpt/s1 --data data --out prof
"""

import sys

from deepomni.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
