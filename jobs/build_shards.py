"""Ray job entrypoint: convert videos + annotations into WebDataset shards (local or s3://).

    ray job submit --working-dir . -- python jobs/build_shards.py --format jsonl --annotations ann.jsonl \
        --videos /data/videos --out s3://bucket/shards --transcode 256
"""

import sys

from mirasol_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "build", *sys.argv[1:]]))
