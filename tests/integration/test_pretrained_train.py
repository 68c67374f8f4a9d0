"""Fine-tuning from pretrained weights on Ray Train: a timm ViT (local) and a Llama-family LM (in S3), the video
encoder frozen. The weights are made here; the run is the tiny preset's, on the synthetic shards."""

from __future__ import annotations

import shutil

import torch

from mirasol_ray import storage
from mirasol_ray.data.shards import TOKENIZER_FILE
from mirasol_ray.launch.train import read_metrics, run_training
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.train.checkpoint import latest_checkpoint_dir, load_torch, resolve_checkpoint
from mirasol_ray.train.prepare import load_prepared
from mirasol_ray.train.weights import load_pretrained


def _weights(timm, transformers, synth_shards, s3_server, tmp_path):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=4, num_classes=0)
    save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, **args), str(tmp_path / "vit"),
                model_args=args, safe_serialization=True)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    lm = tmp_path / "lm"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(lm)
    shutil.copy(f"{synth_shards['dir']}/{TOKENIZER_FILE}", lm / "tokenizer.json")
    uri = s3_server.url("weights", "tiny-llama")
    for f in lm.iterdir():
        storage.write_bytes(storage.join(uri, f.name), f.read_bytes())
    return str(tmp_path / "vit"), uri


def test_finetune_from_pretrained_weights_loss_falls_frozen_parts_stay(ray_local, synth_shards, s3_server, timm,
                                                                       transformers, tmp_path):
    vit, lm = _weights(timm, transformers, synth_shards, s3_server, tmp_path)
    cfg = load_prepared("tiny", [
        f"data.train={synth_shards['dir']}", f"storage.root={tmp_path / 'runs'}", "storage.name=pretrained",
        f"model.video_init={vit}", f"model.text_init={lm}", "train.freeze=[video_encoder.*]",
        "train.lr_mult={audio_encoder.*: 0.5}", "train.steps=10", "train.lr=2e-3", "train.warmup_steps=1",
        "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=10", "data.task=caption",
        "data.decode_cpus=0.25", "data.decode_batch_size=2", "scaling.num_workers=1", "scaling.cpus_per_worker=1"])
    assert cfg.model.text_norm == "rmsnorm" and cfg.model.video_dim == 48 and cfg.data.tokenizer.startswith("s3://")
    summary = run_training(cfg)
    assert summary["steps"] == 10
    uri = str(tmp_path / "runs" / "pretrained")
    text = [r["text"] for r in read_metrics(uri)]
    assert sum(text[-3:]) / 3 < 0.9 * sum(text[:3]) / 3, text  # the captioning loss falls

    trained = load_torch(resolve_checkpoint(latest_checkpoint_dir(uri)))
    loaded = build_model(trained["config"])  # the checkpoint's config alone rebuilds the architecture
    load_pretrained(loaded, loaded.config)
    start = loaded.state_dict()
    video = [k for k in start if k.startswith("video_encoder.")]
    assert video and all(torch.equal(trained["model"][k], start[k]) for k in video)  # frozen: as loaded
    moved = [k for k in start if k.startswith("text_decoder.") and not torch.equal(trained["model"][k], start[k])]
    assert "text_decoder.embed.weight" in moved and any(".cross_attn.to_out." in k for k in moved)
