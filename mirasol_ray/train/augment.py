"""Train-time video augmentation (``train.augment``): plain torch, applied by :func:`~mirasol_ray.train.step.
train_step` to each training micro-batch's video on its device, never at evaluation.

Each clip gets one random geometric transform (a zoom into a crop of the frame and a translation, with an optional
horizontal flip) and one brightness/contrast change, the same for every snippet and frame of the clip (motion and
order stay coherent) and different across clips and steps. Without it a small data set's clips reach the model as
the very same pixels every epoch, and the decoder can memorise them by their random texture instead of learning
what the question asks (docs/HISTORY.md, "The demo").

The random numbers come from a :class:`torch.Generator` seeded from ``(train.seed, step, rank, micro-batch)``
(:func:`augment_generator`): the same seeds give the same augmented pixels, so the same run gives the same metrics.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def augment_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """A CPU generator for one micro-batch's augmentation, seeded from the run's seed, the optimiser step, the
    worker's rank and the micro-batch's index (mixed by NumPy's SeedSequence: nearby tuples give unrelated
    streams)."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank), int(micro), 0xA06]).generate_state(2)
    gen = torch.Generator()
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


def augment_video(video: torch.Tensor, gen: torch.Generator, *, min_scale: float = 0.8, shift: float = 0.1,
                  flip: bool = False, jitter: float = 0.1) -> torch.Tensor:
    """Randomly transformed copy of a batch of clips' video, per clip.

    ``video``: uint8 (B, S, F, H, W, 3). Per clip: a crop of side ``scale`` (uniform in [``min_scale``, 1]) of
    the frame, zoomed back to (H, W), moved by up to ``shift`` of the frame's side beyond the crop's own room
    (edge pixels repeat where the view leaves the frame); mirrored left-right with probability 1/2 if ``flip``;
    contrast scaled by a factor in [1 - ``jitter``, 1 + ``jitter``] around the clip's mean and brightness moved by
    up to ``jitter`` x 255 (no hue change: colour names stay right). Returns uint8 of the same shape, on
    ``video``'s device; the random draws come from ``gen`` (CPU)."""
    B, S, Fr, H, W, C = video.shape
    u = torch.rand(B, 6, generator=gen, dtype=torch.float64)  # (B, 6) on CPU
    scale = 1 - (1 - min_scale) * u[:, 0]  # (B,)
    room = (1 - scale) + 2 * shift  # normalised coordinates span 2 per side
    tx, ty = (2 * u[:, 1] - 1) * room, (2 * u[:, 2] - 1) * room
    mirror = torch.where((u[:, 3] < 0.5) & flip, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = scale * mirror, tx
    theta[:, 1, 1], theta[:, 1, 2] = scale, ty
    contrast = 1 + jitter * (2 * u[:, 4] - 1)  # (B,)
    brightness = jitter * 255 * (2 * u[:, 5] - 1)  # (B,)

    x = video.permute(0, 1, 2, 5, 3, 4).reshape(B, S * Fr * C, H, W).float()  # (B, S*F*3, H, W)
    grid = F.affine_grid(theta.to(x), [B, S * Fr * C, H, W], align_corners=False)  # (B, H, W, 2)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (x - mean) * contrast.to(x).view(B, 1, 1, 1) + mean + brightness.to(x).view(B, 1, 1, 1)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.reshape(B, S, Fr, C, H, W).permute(0, 1, 2, 4, 5, 3).contiguous()  # (B, S, F, H, W, 3)


def augment_batch(batch: dict, cfg, step: int, rank: int, micro: int = 0) -> dict:
    """``batch`` with its video augmented per ``cfg`` (a :class:`~mirasol_ray.config.TrainConfig`) when
    ``cfg.augment`` is on; else ``batch`` itself."""
    if not cfg.augment or "video" not in batch:
        return batch
    gen = augment_generator(cfg.seed, step, rank, micro)
    video = augment_video(batch["video"], gen, min_scale=cfg.augment_min_scale, shift=cfg.augment_shift,
                          flip=cfg.augment_flip, jitter=cfg.augment_jitter)
    return {**batch, "video": video}
