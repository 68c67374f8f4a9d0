"""The small model configuration the unit tests build (a forward and backward take milliseconds): one place, so
a new ModelConfig field or a changed default reaches every test that builds a model."""

from __future__ import annotations

from mirasol_ray.config import ModelConfig

SMALL = dict(max_snippets=3, frames_per_snippet=2, image_size=(32, 32), n_mels=16, mel_frames=8, max_text_len=24,
             vocab_size=40, video_dim=32, video_depth=1, video_heads=2, tubelet_frames=2, patch_size=16,
             audio_dim=32, audio_depth=1, audio_heads=2, audio_patch=(8, 8), combiner_depth=1, combiner_tokens=2,
             ttm_memory=4, ttm_read=2, dim=32, depth=1, heads=2, text_dim=32, text_depth=2, text_heads=2)
"""Smaller than the tiny preset: 3 snippets of 2 frames at 32x32 (a 2x2 grid of 16-pixel patches), 8x8 mel
patches of 16 x 8 mels, one block per tower, 32 wide."""


def small_model_config(**kw) -> ModelConfig:
    """:data:`SMALL` with ``kw`` changed."""
    return ModelConfig(**{**SMALL, **kw})
