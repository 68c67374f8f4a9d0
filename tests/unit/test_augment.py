"""Train-time video augmentation (train.augment): per-clip transforms, coherent over a clip's frames, seeded, and
only in the training step."""

import pytest
import torch

from mirasol_ray.config import ConfigError, load_config
from mirasol_ray.train.augment import augment_batch, augment_generator, augment_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clips(n: int = 6, s: int = 2, f: int = 3, h: int = 24, w: int = 32, same_frames: bool = True) -> torch.Tensor:
    """uint8 (n, s, f, h, w, 3): one textured image per clip (all its frames alike when ``same_frames``)."""
    g = torch.Generator().manual_seed(1)
    if same_frames:
        img = torch.randint(0, 256, (1, 1, 1, h, w, 3), generator=g, dtype=torch.uint8)
        return img.expand(n, s, f, h, w, 3).clone()
    return torch.randint(0, 256, (n, s, f, h, w, 3), generator=g, dtype=torch.uint8)


def test_shape_and_dtype_kept_and_one_transform_per_clip():
    video = _clips()
    out = augment_video(video, augment_generator(0, 3, 0), flip=True)
    assert out.shape == video.shape and out.dtype == torch.uint8
    # every frame of a clip was the same image: after the clip's one transform they still are
    assert all(torch.equal(out[b, s, f], out[b, 0, 0]) for b in range(6) for s in range(2) for f in range(3))
    # the clips were all alike: their transforms differ
    assert len({out[b].sum().item() for b in range(6)}) == 6
    assert not torch.equal(out, video)


def test_reproducible_from_the_seed_and_new_at_every_step_and_rank():
    video = _clips(same_frames=False)
    a = augment_video(video, augment_generator(7, 3, 0))
    assert torch.equal(a, augment_video(video, augment_generator(7, 3, 0)))
    for other in (augment_generator(7, 4, 0), augment_generator(7, 3, 1), augment_generator(8, 3, 0),
                  augment_generator(7, 3, 0, micro=1)):
        assert not torch.equal(a, augment_video(video, other))


def test_zero_strength_is_the_identity_and_flip_mirrors():
    video = _clips(n=16, same_frames=False)
    same = augment_video(video, augment_generator(0, 0, 0), min_scale=1.0, shift=0.0, jitter=0.0)
    assert torch.equal(same, video)
    flipped = augment_video(video, augment_generator(0, 0, 0), min_scale=1.0, shift=0.0, jitter=0.0, flip=True)
    mirrored = [torch.equal(flipped[b], video[b].flip(-2)) for b in range(16)]
    kept = [torch.equal(flipped[b], video[b]) for b in range(16)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_jitter_changes_brightness_not_hue():
    """A grey clip stays grey (equal R, G, B) under brightness/contrast jitter: colour names survive."""
    grey = torch.full((8, 1, 2, 16, 16, 3), 100, dtype=torch.uint8)
    grey[:, :, :, 4:12, 4:12] = 180
    out = augment_video(grey, augment_generator(0, 0, 0), jitter=0.3)
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2])
    assert len({out[b].float().mean().item() for b in range(8)}) > 1


def test_off_returns_the_batch_itself():
    cfg = load_config("tiny", []).train
    assert cfg.augment is False
    batch = {"video": _clips()}
    assert augment_batch(batch, cfg, 0, 0) is batch


def test_bad_strengths_are_config_errors():
    for override in ("train.augment_min_scale=0", "train.augment_shift=-0.1", "train.augment_jitter=1.5"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config("tiny", [override])


def test_the_training_step_augments_seeded_and_evaluation_does_not(fresh_training):
    """train_step hands the model the video augmented with (train.seed, step, rank 0); eval_loss and predict_batch
    see the batch's own pixels."""
    from mirasol_ray.bench.step import synthetic_batch
    from mirasol_ray.data.text import get_tokenizer
    from mirasol_ray.train.step import eval_loss, predict_batch, train_step

    cfg = load_config("tiny", ["train.steps=5", "train.augment=true", "train.seed=3"])
    model, opt, sched = fresh_training(cfg)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0]["video"].clone()))
    enc_seen = []
    model.video_encoder.register_forward_pre_hook(lambda mod, args: enc_seen.append(args[0].clone()))
    batch = synthetic_batch(cfg, 2)
    for _ in range(2):
        train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
    for step in range(2):
        expected = augment_video(batch["video"], augment_generator(3, step, 0),
                                 min_scale=cfg.train.augment_min_scale, shift=cfg.train.augment_shift,
                                 jitter=cfg.train.augment_jitter)
        assert torch.equal(seen[step], expected)
    assert not torch.equal(seen[0], seen[1])

    seen.clear()
    enc_seen.clear()
    eval_loss(model, batch, torch.device("cpu"))
    assert torch.equal(seen[0], batch["video"])
    eval_input = enc_seen[0]  # the video encoder's input from the batch's own pixels
    enc_seen.clear()
    predict_batch(model, batch, get_tokenizer(), torch.device("cpu"), max_new_tokens=2)
    assert torch.equal(enc_seen[0], eval_input)
