"""Ray job entrypoint: task metrics of a checkpoint over a dataset (Ray Data batch inference).

    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint s3://bucket/runs/ft --data s3://bucket/val
"""

import sys

from mirasol_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
