"""Pretrained weights: timm ViTs into the snippet encoders, Hugging Face causal LMs into the text decoder.

The weights are made here (timm ``pretrained=False``, transformers models from a config), perturbed so that every
tensor matters, and saved the way each library saves them; the references are timm and transformers themselves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mirasol_ray.config import load_config
from mirasol_ray.data.text import get_tokenizer, train_bpe_tokenizer
from mirasol_ray.model.mirasol import build_model
from mirasol_ray.model.pretrained import PretrainedError, startup_table
from mirasol_ray.train.checkpoint import load_model, model_state
from mirasol_ray.train.prepare import load_prepared, prepare
from mirasol_ray.train.weights import load_pretrained

VIT = dict(patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5)
TEXTS = ["a red square moves left while a low tone plays", "the blue circle grows", "what colour is the shape?",
         "a green triangle spins slowly", "two shapes cross the frame", "the tone rises then falls"] * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter (norms, biases, tokens included): a tensor loaded into the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _timm_vit(timm, **kw):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**{**VIT, **kw}).eval()


@pytest.fixture(scope="module")
def vit_dir(timm, tmp_path_factory):
    """A small timm ViT saved by timm (config.json with the architecture + model.safetensors), 32x32 inputs."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, **VIT).eval()
    _perturb(model, 1)
    out = tmp_path_factory.mktemp("vit")
    save_for_hf(model, str(out), model_args={**VIT, "img_size": 32}, safe_serialization=True)
    return out, model


def _vit_cfg(vit_path, *extra):
    return load_prepared("tiny", [f"model.video_init={vit_path}", f"model.audio_init={vit_path}",
                                "data.frames_per_snippet=1", "model.tubelet_frames=1", "model.audio_patch_norm=false",
                                *extra])


def _frames(n, H, W, F_=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n, F_, H, W, 3), generator=g, dtype=torch.uint8)


def _normalise(frames: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float NCHW as timm's transforms give it."""
    x = frames.float() / 255.0
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [(32, 32), (48, 40)], ids=["same-grid", "interpolated"])
def test_vit_encoders_compute_what_timm_computes(timm, vit_dir, size):
    """Video (2D patches, one frame) and audio (the 3-channel patch embedding summed) encoders from a timm ViT give
    timm's forward_features; at another input size, against timm's own resample_abs_pos_embed."""
    from timm.layers import resample_abs_pos_embed

    path, ref = vit_dir
    H, W = size
    n_mels, mel_frames = (32, 32) if size == (32, 32) else (32, 16)
    cfg = _vit_cfg(path, f"data.height={H}", f"data.width={W}", f"data.n_mels={n_mels}",
                   f"data.mel_frames={mel_frames}")
    m = cfg.model
    assert (m.video_dim, m.video_depth, m.video_heads, m.patch_size, m.video_prefix_tokens) == (48, 2, 4, 8, 1)
    assert m.audio_patch == (8, 8) and m.video_norm_eps == 1e-6 and m.video_pos == "factorized"
    torch.manual_seed(0)
    model = build_model(m).eval()
    reports = load_pretrained(model, m)
    table = startup_table(reports, model)
    assert "video_encoder" in table and "audio_encoder" in table and "combiner" in table
    if size != (32, 32):
        assert any("pos_embed 4x4 -> 6x5" in how for _, how in reports[0].adapted)

    def at(img_size, in_chans=3):
        """The reference: timm's model at this input size, with timm's own resampling of the position table."""
        model2 = _timm_vit(timm, img_size=img_size, in_chans=in_chans)
        sd = dict(ref.state_dict())
        grid = (img_size[0] // 8, img_size[1] // 8)
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], grid, (4, 4), num_prefix_tokens=1)
        if in_chans == 1:
            sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].sum(1, keepdim=True)
        model2.load_state_dict(sd)
        return model2

    frames = _frames(3, H, W)
    with torch.no_grad():
        ours = model.video_encoder(frames)[0]  # (S, 1 + N, D)
        theirs = at((H, W)).forward_features(_normalise(frames, m.video_mean, m.video_std))
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)

    audio = torch.randn(1, 2, n_mels, mel_frames)
    with torch.no_grad():
        ours = model.audio_encoder(audio)[0]
        # the same function as the 3-channel ViT on the spectrogram as a grey image
        theirs = at((n_mels, mel_frames)).forward_features(audio[0, :, None].expand(-1, 3, -1, -1))
        theirs1 = at((n_mels, mel_frames), in_chans=1).forward_features(audio[0, :, None])
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours, theirs1, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("inflation", ["central", "average"])
def test_tubelet_inflation(timm, vit_dir, inflation):
    """A 2-frame tubelet from a 2D patch embedding: "central" sees frame 1 as the image ViT did, "average" the
    mean of the two frames."""
    path, ref = vit_dir
    cfg = _vit_cfg(path, "data.frames_per_snippet=2", "model.tubelet_frames=2", f"model.video_inflation={inflation}",
                   "data.height=32", "data.width=32")
    model = build_model(cfg.model).eval()
    reports = load_pretrained(model, cfg.model)
    assert any(f"{inflation} inflation" in how for _, how in reports[0].adapted)
    frames = _frames(2, 32, 32, F_=2)
    m = cfg.model
    x = _normalise(frames, m.video_mean, m.video_std).reshape(2, 2, 3, 32, 32)  # (S, F, C, H, W)
    seen = x[:, 1] if inflation == "central" else x.mean(1)
    with torch.no_grad():
        torch.testing.assert_close(model.video_encoder(frames)[0], ref.forward_features(seen), atol=2e-5, rtol=1e-4)


def test_bare_state_dicts_safetensors_and_pth(timm, vit_dir, tmp_path):
    """A bare state dict (no config.json): heads come from the config; .pth through torch.load(weights_only=True)."""
    from safetensors.torch import save_file

    _, ref = vit_dir
    sd = ref.state_dict()
    save_file(sd, str(tmp_path / "vit.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "vit.pth")  # nested, as training scripts save
    frames = _frames(1, 32, 32)
    for name in ("vit.safetensors", "vit.pth"):
        cfg = load_prepared("tiny", [f"model.video_init={tmp_path / name}", "data.frames_per_snippet=1",
                                   "model.tubelet_frames=1", "data.height=32", "data.width=32", "model.video_heads=4"])
        model = build_model(cfg.model).eval()
        reports = load_pretrained(model, cfg.model)
        assert any("heads: 4" in n for n in reports[0].notes)
        with torch.no_grad():
            ours = model.video_encoder(frames)[0]
            theirs = ref.forward_features(_normalise(frames, cfg.model.video_mean, cfg.model.video_std))
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_missing_key_fails_naming_it(timm, vit_dir, tmp_path):
    from safetensors.torch import save_file

    _, ref = vit_dir
    sd = {k: v for k, v in ref.state_dict().items() if k != "blocks.1.mlp.fc2.weight"}
    save_file(sd, str(tmp_path / "vit.safetensors"))
    args = [f"model.video_init={tmp_path / 'vit.safetensors'}", "data.height=32", "data.width=32",
            "model.video_heads=4"]
    with pytest.raises(PretrainedError, match=r"missing key blocks\.1\.mlp\.fc2\.weight"):
        load_prepared("tiny", args)
    # allowed: the rest loads, the missing one stays as initialised and is reported
    cfg = load_prepared("tiny", args + ["model.init_strict=false"])
    model = build_model(cfg.model)
    reports = load_pretrained(model, cfg.model)
    assert "skipped: missing key blocks.1.mlp.fc2.weight" in startup_table(reports, model)
    torch.testing.assert_close(model.video_encoder.vit.blocks[0].mlp[2].weight, ref.blocks[0].mlp.fc2.weight)


class Opaque:
    """Not a tensor or a plain container: unpickling it needs weights_only=False."""


def test_pickle_needing_weights_only_false_is_refused(vit_dir, tmp_path):
    _, ref = vit_dir
    torch.save({"state_dict": ref.state_dict(), "args": Opaque()}, tmp_path / "train.pth")
    with pytest.raises(PretrainedError, match="refused: this pickle needs torch.load"):
        load_prepared("tiny", [f"model.video_init={tmp_path / 'train.pth'}", "model.video_heads=4"])


def test_a_hub_name_is_refused_with_how_to_download():
    with pytest.raises(PretrainedError, match="never downloads weights: download it first .* and pass that path"):
        load_prepared("tiny", ["model.text_init=Qwen/Qwen2.5-0.5B"])
    with pytest.raises(PretrainedError, match="no such file or folder"):
        load_prepared("tiny", ["model.video_init=/nonexistent/vit.safetensors"])


# ----------------------------------------------------------------------------------------------------------------
# language models


def _lm_configs(transformers):
    GPT2Config, LlamaConfig, Qwen2Config = transformers.GPT2Config, transformers.LlamaConfig, transformers.Qwen2Config

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    return {
        "llama-gqa-untied": LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5),
        "qwen2-bias-tied": Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=True),
        "llama3-rope-scaling": LlamaConfig(**common, num_key_value_heads=4, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "gpt2": GPT2Config(vocab_size=290, n_positions=128, n_embd=64, n_layer=2, n_head=4),
    }


@pytest.fixture(scope="module")
def lm_dirs(transformers, tmp_path_factory):
    """Tiny LMs of each family, random weights, saved by save_pretrained beside a BPE tokenizer.json."""
    tok_json = train_bpe_tokenizer(TEXTS, vocab_size=300)
    out = {}
    for i, (name, config) in enumerate(_lm_configs(transformers).items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        _perturb(model, 10 + i)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        (d / "tokenizer.json").write_text(tok_json)
        out[name] = (d, model)
    # the same weights with a config.json as transformers v4 wrote it (rope_theta + rope_scaling)
    d, model = out["llama3-rope-scaling"]
    v4 = tmp_path_factory.mktemp("llama3-v4-config")
    for f in d.iterdir():
        shutil.copy(f, v4 / f.name)
    cfg = json.loads((v4 / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (v4 / "config.json").write_text(json.dumps(cfg))
    out["llama3-v4-config"] = (v4, model)
    # sharded, as large checkpoints come: model.safetensors.index.json + model-0000N-of-0000M.safetensors
    d, model = out["llama-gqa-untied"]
    sharded = tmp_path_factory.mktemp("llama-sharded")
    model.save_pretrained(sharded, max_shard_size="40KB")
    shutil.copy(d / "tokenizer.json", sharded / "tokenizer.json")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    out["llama-sharded"] = (sharded, model)
    return out


def _decoder_logits(model, ids, context=None):
    B, L = ids.shape
    valid = torch.ones(B, L, dtype=torch.bool)
    mask = None if context is None else torch.ones(B, context.shape[1], dtype=torch.bool)
    return model.text_decoder.logits(model.text_decoder(ids, valid, context, mask))


@pytest.mark.parametrize("family", ["llama-gqa-untied", "qwen2-bias-tied", "llama3-rope-scaling", "llama3-v4-config",
                                    "llama-sharded", "gpt2"])
def test_text_decoder_reproduces_the_lm(lm_dirs, family):
    """Our decoder with the LM's weights gives the LM's logits: with no context, and with one (the new
    cross-attention starts as identity); step by step with the key/value cache too."""
    path, hf = lm_dirs[family]
    cfg = load_prepared("tiny", [f"model.text_init={path}"])
    assert cfg.data.tokenizer == str(path / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    reports = load_pretrained(model, cfg.model)
    assert "decoder starts as the LM" in startup_table(reports, model)
    V = hf.config.vocab_size
    ids = torch.randint(0, min(V, cfg.model.vocab_size), (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = _decoder_logits(model, ids)
        torch.testing.assert_close(ours[..., :V], theirs, atol=1e-4, rtol=1e-4)
        context = torch.randn(2, 6, cfg.model.dim)
        torch.testing.assert_close(_decoder_logits(model, ids, context)[..., :V], theirs, atol=1e-4, rtol=1e-4)
        # incremental decoding with the cache: the last 4 tokens one at a time
        dec, cache = model.text_decoder, model.text_decoder.new_cache()
        valid = torch.ones(2, 20, dtype=torch.bool)
        dec(ids[:, :16], valid[:, :16], cache=cache)
        steps = [dec.logits(dec(ids[:, i:i + 1], valid[:, :i + 1], cache=cache))[:, 0, :V] for i in range(16, 20)]
        torch.testing.assert_close(torch.stack(steps, 1), theirs[:, 16:], atol=1e-4, rtol=1e-4)
    if family == "gpt2":  # the tokenizer knows 10 more tokens than this LM: new rows, the mean of the LM's
        assert cfg.model.embed_rows == V + 10
        assert any("10 new row(s)" in how for _, how in reports[0].adapted)
        torch.testing.assert_close(model.text_decoder.embed.weight[V:], hf.transformer.wte.weight.mean(0).expand(10, -1))


def test_the_lm_tokenizer_becomes_the_runs_and_round_trips(transformers, lm_dirs):
    path, _ = lm_dirs["llama-gqa-untied"]
    cfg = load_prepared("tiny", [f"model.text_init={path}"])
    tok = get_tokenizer(cfg.data.tokenizer)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    assert cfg.model.vocab_size == tok.vocab_size and cfg.model.embed_rows == 320
    for text in ("a red square moves left", "what colour is the shape?", "zebra quickly 42"):
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_a_model_built_from_pretrained_round_trips_without_the_files(lm_dirs, vit_dir, tmp_path):
    """The checkpoint's config carries the architecture: the model rebuilds with the pretrained files gone."""
    path, _ = lm_dirs["qwen2-bias-tied"]
    copy = tmp_path / "lm"
    shutil.copytree(path, copy)
    cfg = load_prepared("tiny", [f"model.text_init={copy}", f"model.video_init={vit_dir[0]}"])
    model = build_model(cfg.model).eval()
    load_pretrained(model, cfg.model)
    torch.save(model_state(model), tmp_path / "model.pt")
    shutil.rmtree(copy)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    again = load_model(state).eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(_decoder_logits(again, ids), _decoder_logits(model, ids))
    assert Path(cfg.data.tokenizer).name == "tokenizer.json"


def test_lm_missing_key_names_it(lm_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = lm_dirs["llama-gqa-untied"]
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PretrainedError, match=r"missing key model\.layers\.1\.mlp\.down_proj\.weight"):
        load_prepared("tiny", [f"model.text_init={tmp_path}"])


# ----------------------------------------------------------------------------------------------------------------
# the split: loading a config reads nothing; the driver's prepare step reads the files


def test_loading_a_config_reads_no_checkpoint_prepare_does(lm_dirs, tmp_path):
    """load_config parses and validates only: a checkpoint that is not there is the prepare step's error."""
    cfg = load_config("tiny", ["model.video_init=/nonexistent/vit.safetensors"])
    assert cfg.model.video_init == "/nonexistent/vit.safetensors"
    with pytest.raises(PretrainedError, match="no such file or folder"):
        prepare(cfg)


def test_prepare_resolves_an_lm_from_a_loaded_config_and_is_stable(lm_dirs, tmp_path):
    """From a built Config (byte tokenizer, preset sizes) as from the raw mapping: the LM's architecture and its
    tokenizer's vocabulary; preparing a prepared config changes nothing; a worker rebuilds it from its dict with
    the files gone."""
    path, hf = lm_dirs["qwen2-bias-tied"]
    copy = tmp_path / "lm"
    shutil.copytree(path, copy)
    loaded = load_config("tiny", [f"model.text_init={copy}"])
    assert loaded.data.tokenizer == "byte" and loaded.model.text_dim != hf.config.hidden_size
    cfg = prepare(loaded)
    assert cfg == load_prepared("tiny", [f"model.text_init={copy}"]) == prepare(cfg)
    tok = get_tokenizer(cfg.data.tokenizer)
    assert cfg.model.text_dim == hf.config.hidden_size
    assert (cfg.model.vocab_size, cfg.model.pad_id, cfg.model.eos_id) == (tok.vocab_size, tok.pad_id, tok.eos_id)
    shutil.rmtree(copy)
    from mirasol_ray.config import from_dict

    assert from_dict(cfg.to_dict()) == cfg  # what each worker does: no file is read
