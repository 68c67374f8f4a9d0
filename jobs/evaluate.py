"""Ray job: task metrics of a checkpoint over a dataset (accuracy per task and question type, caption token F1),
as Ray Data batch inference over the cluster (an actor pool holding the model; a GPU each when there are GPUs).

    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint s3://bucket/runs/ft \\
        --data s3://bucket/shards/val --json
    mirasol submit evaluate --checkpoint s3://bucket/runs/ft --data s3://bucket/shards/val --num-actors 8
"""

import sys

from mirasol_ray.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__, ["eval"], sys.argv[1:]))
