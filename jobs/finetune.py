"""Ray job entrypoint: finetune on the cluster this job runs in.

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}' -- \
        python jobs/finetune.py --config base --set data.train=s3://bucket/shards/train --set storage.root=s3://bucket/runs
"""

import sys

from mirasol_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:], "--set", "train.stage=finetune"]))
