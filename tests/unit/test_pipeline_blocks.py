"""How the Ray Data pipeline cuts a pass into decode tasks (no Ray needed)."""

from __future__ import annotations

import pytest

from mirasol_ray.config import ConfigError, load_config
from mirasol_ray.data.pipeline import MAX_BLOCK, block_sizes, decode_block


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 17, 100, 480, 1001])
@pytest.mark.parametrize("size", [1, 2, 4, 16, 64])
def test_blocks_cover_every_item_once_and_never_exceed_the_size(n, size):
    sizes = block_sizes(n, size)
    assert sum(sizes) == n and all(0 < s <= size for s in sizes)


def test_blocks_ramp_up_at_the_start_and_down_at_the_end():
    sizes = block_sizes(480, 16)
    assert sizes[:7] == [2, 2, 4, 4, 8, 8, 16] and sizes[-6:] == [8, 8, 4, 4, 2, 2]
    assert max(sizes) == 16 and sum(s >= 15 for s in sizes) > len(sizes) // 2  # the middle: even blocks
    # a pass too short for the ramp still gives several CPUs work at once
    assert block_sizes(8, 16) == [2, 2, 2, 2]
    assert block_sizes(4, 2) == [1, 1, 1, 1]
    # the automatic cap: a pass of 480 small clips is 16 tasks, not 39, and still starts and ends on 8 clips
    sizes = block_sizes(480, MAX_BLOCK)
    assert sizes[:6] == [8, 8, 16, 16, 32, 32] and sizes[-2:] == [8, 8] and len(sizes) == 16


def test_automatic_block_size_follows_the_row_bytes():
    assert decode_block(load_config("tiny", []).data) == MAX_BLOCK  # small rows: the cap
    big = load_config("finetune_msrvtt_qa", []).data  # 8 x 16 frames at 224 px: ~20 MB a row
    assert 1 <= decode_block(big) < 8
    assert decode_block(load_config("tiny", ["data.decode_batch_size=3"]).data) == 3
    with pytest.raises(ConfigError, match="decode_batch_size"):
        load_config("tiny", ["data.decode_batch_size=-1"])
