"""Ray job: convert videos + annotations (jsonl, msrvtt-qa, ...) into WebDataset shards and manifest.json,
local or s3://, optionally re-encoded at training resolution with short keyframe intervals (--transcode).

The clips are Ray tasks over every node of the cluster the job runs on (on the ``decode`` nodes where the cluster
has them); --num-cpus N caps the clips in flight. Submitted again with the same arguments after a stop, it keeps
the shards already complete in --out and makes the rest.

    ray job submit --working-dir . -- python jobs/build_shards.py --format jsonl --annotations ann.jsonl \\
        --videos /data/videos --out s3://bucket/shards --transcode 256
    mirasol submit build_shards --format msrvtt-qa --annotations /data/msrvtt/train_qa.json ...
"""

import sys

from mirasol_ray.cli import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__, ["shards", "build"], sys.argv[1:]))
