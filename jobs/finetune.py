"""Ray job entrypoint: finetune on the cluster this job runs in.

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}' -- \
        python jobs/finetune.py --config base --set data.train=s3://bucket/shards/train --set data.task=all \
        --set train.init_from=s3://bucket/runs/pretrain --set storage.root=s3://bucket/runs

Fine-tuning starts from trained weights on task rows: without ``train.init_from`` (or ``model.*_init``), or with
``data.task=caption``, the run refuses to start and says so (:func:`mirasol_ray.config.check_stage`).
"""

import sys

from mirasol_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:], "--set", "train.stage=finetune"]))
