"""Ray job: fine-tune a pretrained Mirasol model (train.stage=finetune): open-ended QA, multiple choice and
class labels, starting from the weights of train.init_from (a pretrain run folder, checkpoint folder or
model.pt) or from pretrained parts (model.video_init/audio_init/text_init); with neither it refuses to start
unless train.finetune_from_scratch=true. data.task defaults to those tasks (data.task=all keeps the captions).
Running it again with the same storage.name resumes from the run's last checkpoint.

    ray job submit --working-dir . -- python jobs/finetune.py --config base \\
        --set train.init_from=s3://bucket/runs/pre --set data.train=s3://bucket/shards/train \\
        --set storage.root=s3://bucket/runs --set storage.name=ft
    mirasol submit finetune --config base --set train.init_from=s3://bucket/runs/pre --set ...

With ``data.task=caption``, or with no weights to start from, the run refuses to start and says so
(:meth:`mirasol_ray.config.Config.check_start`).
"""

import sys

from mirasol_ray.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__, ["train"], sys.argv[1:], owned=("train.stage=finetune",)))
