"""Ray job: pretrain a Mirasol model from scratch on captioned clips (train.stage=pretrain): caption rows for
the text decoder plus the time-aligned model's latent prediction loss. Checkpoints, metrics and summary go to
storage.root/storage.name; running it again with the same storage.name resumes from the last checkpoint.

    ray job submit --working-dir . -- python jobs/pretrain.py --config base \\
        --set data.train=s3://bucket/shards/train --set data.val=s3://bucket/shards/val \\
        --set storage.root=s3://bucket/runs --set storage.name=pre
    mirasol submit pretrain --config base --set data.train=... --set storage.root=... --set storage.name=pre
"""

import sys

from mirasol_ray.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__, ["train"], sys.argv[1:], owned=("train.stage=pretrain",)))
