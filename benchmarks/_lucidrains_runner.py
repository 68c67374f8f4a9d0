"""Times lucidrains' mirasol-pytorch 0.0.16 forward+backward; run by .venv-lucidrains's python, prints JSON.

    .venv-lucidrains/bin/python benchmarks/_lucidrains_runner.py '{"dim": 256, ...}'

Called by ``python -m benchmarks.lucidrains`` with the dimensions our side uses (see
:func:`benchmarks.lucidrains.lucidrains_dims`). Imports nothing from this project: it runs in the other venv.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from mirasol_pytorch import Mirasol


def main() -> int:
    d = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(d["threads"])
    model = Mirasol(
        dim=d["dim"], num_text_tokens=d["vocab_size"], video_image_size=d["image_size"],
        video_frames_per_timechunk=d["frames_per_snippet"], audio_freq_dim=d["n_mels"],
        audio_time_dim_per_timechunk=d["mel_frames"], audio_patch_size=tuple(d["audio_patch"]),
        video_patch_size=(d["patch_size"], d["tubelet_frames"]),
        # their video reconstruction head maps to whole snippets (64x64x4x3 outputs): shrink it to one patch
        video_recon_patch_size=(d["patch_size"], d["tubelet_frames"]),
        video_encoder=dict(depth=d["video_depth"], heads=d["heads"], attn_dim_head=d["dim"] // d["heads"]),
        audio_encoder=dict(depth=d["audio_depth"], heads=d["heads"], attn_dim_head=d["dim"] // d["heads"]),
        encoder_depth=d["depth"], decoder_depth=d["text_depth"], combiner_depth=d["combiner_depth"],
        combiner_output_num_tokens=d["combiner_tokens"], attn_heads=d["heads"],
        attn_dim_head=d["dim"] // d["heads"], text_max_seq_len=d["text_len"] + 1,
        audio_video_mask_prob=0.0, text_forgetful_causal_mask_prob=0.0,
    )
    B, S, F = d["batch"], d["snippets"], d["frames_per_snippet"]
    video = torch.randn(B, 3, S * F, d["image_size"], d["image_size"])
    audio = torch.randn(B, d["n_mels"], S * d["mel_frames"])
    text = torch.randint(3, d["vocab_size"], (B, d["text_len"]))
    times = []
    for i in range(d["warmup"] + d["repeats"]):
        t0 = time.perf_counter()
        model(video=video, audio=audio, text=text).backward()
        if i >= d["warmup"]:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"fwd_bwd_s": statistics.median(times), "times_s": times,
                      "params": sum(p.numel() for p in model.parameters())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
