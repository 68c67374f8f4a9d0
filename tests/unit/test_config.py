"""Config loading: presets, YAML files, --set overrides, errors that name the key."""

import pytest

from mirasol_ray.config import ConfigError, load_config, preset_names


def test_presets_load_and_geometry_follows_data():
    assert {"tiny", "small", "base", "mirasol3b", "demo"} <= set(preset_names())
    cfg = load_config("tiny", ["data.frames_per_snippet=8", "data.height=32", "data.width=48"])
    assert cfg.model.frames_per_snippet == 8 and cfg.model.image_size == (32, 48)
    assert cfg.model.max_text_len == cfg.data.max_prompt_len + cfg.data.max_target_len
    demo = load_config("demo")  # extends tiny
    assert demo.model.dim == load_config("tiny").model.dim and demo.train.steps != load_config("tiny").train.steps


def test_set_overrides_parse_values():
    cfg = load_config("tiny", ["train.lr=3e-3", "train.steps=7", "scaling.use_gpu=true", "data.train=s3://b/x"])
    assert cfg.train.lr == 0.003 and cfg.train.steps == 7 and cfg.scaling.use_gpu is True
    assert cfg.data.train == "s3://b/x"


@pytest.mark.parametrize("override, needle", [
    (["train.lrr=1"], "train.lrr"),
    (["nosuch.key=1"], "nosuch"),
    (["train.steps=abc"], "train.steps"),
    (["data.task=dance"], "data.task"),
    (["model.combiner=rnn"], "combiner"),
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError if "combiner" not in needle else ValueError, match=needle):
        load_config("tiny", override)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(str(tmp_path / "nowhere.yaml"))
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("nonexistent")
    p = tmp_path / "c.yaml"
    p.write_text("base: tiny\ntrain:\n  steps: 3\n")
    assert load_config(str(p)).train.steps == 3


def test_cli_bad_key_is_one_line_and_nonzero(capsys):
    from mirasol_ray.cli import main

    assert main(["train", "--config", "tiny", "--set", "train.bogus=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.bogus" in err[0]


def test_cli_traceback_only_with_mirasol_debug(monkeypatch, capsys):
    from mirasol_ray.cli import main

    monkeypatch.setenv("MIRASOL_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.bogus"):  # raised as is: Python prints its traceback
        main(["train", "--config", "tiny", "--set", "train.bogus=1"])
    assert capsys.readouterr().err == ""


def test_base_cycles_are_named(tmp_path):
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*self\.yaml -> .*self\.yaml"):
        load_config(str(tmp_path / "self.yaml"))
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(str(tmp_path / "a.yaml"))


def test_relative_base_is_found_beside_the_yaml_not_in_the_current_folder(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "sub").mkdir(parents=True)
    (conf / "common.yaml").write_text("base: tiny\ntrain:\n  steps: 7\n  lr: 0.002\n")
    (conf / "sub" / "run.yaml").write_text("base: ../common.yaml\ntrain:\n  steps: 9\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "common.yaml").write_text("train:\n  steps: 1\n  lr: 0.5\n")  # must not be the one read
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(conf / "sub" / "run.yaml"))
    assert (cfg.train.steps, cfg.train.lr) == (9, 0.002)
    (conf / "broken.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"conf/missing\.yaml.*broken\.yaml"):
        load_config(str(conf / "broken.yaml"))


@pytest.mark.parametrize("override, data_key", [
    ("model.frames_per_snippet=8", "data.frames_per_snippet"),
    ("model.image_size=[32,32]", "data.height, data.width"),
    ("model.mel_frames=16", "data.mel_frames"),
    ("model.max_text_len=200", "data.max_prompt_len + data.max_target_len"),
    ("model.vocab_size=500", "data.tokenizer"),
])
def test_model_geometry_set_by_hand_is_an_error_naming_the_data_key(override, data_key):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value).startswith(f"{key}=") and "cannot be set" in str(err.value)
    assert str(err.value).endswith(f"set {data_key} instead")


def test_a_saved_run_config_with_its_derived_values_loads():
    from mirasol_ray.config import from_dict

    cfg = load_config("tiny", ["data.frames_per_snippet=8", "model.frames_per_snippet=8"])  # the same value: fine
    assert from_dict(cfg.to_dict()) == cfg


def test_cli_geometry_error_is_one_line(capsys):
    from mirasol_ray.cli import main

    assert main(["train", "--config", "tiny", "--set", "model.frames_per_snippet=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mirasol: error: model.frames_per_snippet=8 cannot be set: it follows data.frames_per_snippet "
                   "(4 here); set data.frames_per_snippet instead"]


@pytest.mark.parametrize("sets, message", [
    (["train.stage=finetune", "data.task=caption"], "train.stage=finetune trains on task rows, but data.task=caption"),
    (["train.stage=finetune", "data.task=qa"], "train.stage=finetune needs train.init_from"),
])
def test_finetune_stage_means_task_rows_from_trained_weights(tmp_path, capsys, sets, message):
    """``train.stage=finetune`` (what jobs/finetune.py sets) refuses to train captions, or from scratch, before any
    work starts (no Ray, no data read); pretrain and a finetune with its starting point are accepted."""
    from mirasol_ray.cli import main

    args = ["train", "--config", "tiny", "--set", f"data.train={tmp_path}/absent"]
    assert main([*args, *(x for s in sets for x in ("--set", s))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mirasol: error: {message}")
    load_config("tiny", ["train.stage=pretrain"]).check_start()
    load_config("tiny", ["train.stage=finetune", "data.task=all", "train.init_from=runs/pre"]).check_start()


def test_evaluation_counts_are_not_negative():
    with pytest.raises(ConfigError, match="train.eval_train_batches must be >= 0"):
        load_config("tiny", ["train.eval_train_batches=-1"])
    assert load_config("tiny", ["train.eval_train_batches=0"]).train.eval_train_batches == 0


# ----------------------------------------------------------------------------------------------------------------
# the vocabulary: the byte tokenizer's is known to the config; a tokenizer file's is read by the driver's prepare


@pytest.fixture
def bpe_file(tmp_path):
    from mirasol_ray.data.text import get_tokenizer, train_bpe_tokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text(train_bpe_tokenizer(["a red square moves left", "what colour is the shape?"] * 4, 300))
    return str(path), get_tokenizer(str(path))


def test_the_byte_tokenizer_vocabulary_is_filled_without_a_tokenizer():
    from mirasol_ray.data.text import ByteTokenizer

    m = load_config("tiny").model
    tok = ByteTokenizer()
    assert (m.vocab_size, m.pad_id, m.bos_id, m.eos_id) == (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)


def test_a_tokenizer_file_is_read_by_prepare_not_by_load_config(bpe_file, tmp_path):
    from mirasol_ray.config import UNREAD, from_dict
    from mirasol_ray.model.mirasol import build_model
    from mirasol_ray.train.prepare import prepare

    cfg = load_config("tiny", [f"data.tokenizer={tmp_path / 'absent.json'}"])  # not read: no error yet
    assert cfg.tokenizer_unread() == ["model.vocab_size", "model.pad_id", "model.bos_id", "model.eos_id"]
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        prepare(cfg)
    with pytest.raises(ConfigError, match="model.vocab_size is unread: data.tokenizer has not been read yet"):
        build_model(cfg.model)  # a model never silently takes a stand-in vocabulary
    path, tok = bpe_file
    unprepared = load_config("tiny", [f"data.tokenizer={path}"])
    assert unprepared.model.vocab_size == UNREAD
    assert from_dict(unprepared.to_dict()) == unprepared
    cfg = prepare(unprepared)
    assert (cfg.model.vocab_size, cfg.model.pad_id, cfg.model.bos_id, cfg.model.eos_id) == (
        tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
    assert from_dict(cfg.to_dict()) == cfg and prepare(cfg) == cfg  # a worker's rebuild; preparing again


def test_a_vocabulary_that_contradicts_the_tokenizer_is_an_error_naming_it(bpe_file):
    from mirasol_ray.train.prepare import load_prepared

    path, tok = bpe_file
    with pytest.raises(ConfigError) as err:
        load_prepared("tiny", [f"data.tokenizer={path}", "model.vocab_size=500"])
    assert str(err.value) == (f"model.vocab_size=500 cannot be set: it follows data.tokenizer ({tok.vocab_size} "
                              "here); set data.tokenizer instead")
    same = load_prepared("tiny", [f"data.tokenizer={path}", f"model.eos_id={tok.eos_id}"])  # the same value: fine
    assert same.model.eos_id == tok.eos_id
