"""Ray job entrypoint: a Ray Tune sweep over fine-tuning runs on the cluster this job runs in.

    ray job submit --working-dir . --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}' -- \
        python jobs/sweep.py --config base --space space.yaml --set data.train=s3://bucket/shards/train \
        --set data.val=s3://bucket/shards/val --set train.eval_every=200 --storage s3://bucket/sweeps --name lr-sweep

Each trial is a Ray Train run with its own workers; `--max-concurrent` defaults to what the cluster holds. Read the
results afterwards, with no cluster: `mirasol results s3://bucket/sweeps/lr-sweep`. Same arguments as `mirasol sweep`
(`--help`); `--resume` continues the sweep --name after the job (or its cluster) died, and `--resume-or-start`
continues it if it exists and starts it if not: the one to use in a job that may be submitted again (a retried or
re-applied RayJob: cluster/kuberay/rayjob-sweep.yaml).
"""

import sys

from mirasol_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
