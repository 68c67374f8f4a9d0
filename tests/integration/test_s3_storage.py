"""storage.py against a real S3-compatible server on loopback."""

from mirasol_ray import storage


def test_s3_roundtrip_text_and_listing(s3_server):
    uri = s3_server.url("storage-test", "a", "hello.txt")
    storage.write_text(uri, "hello")
    assert storage.exists(uri)
    assert storage.read_text(uri) == "hello"
    assert storage.listdir(s3_server.url("storage-test", "a")) == ["hello.txt"]


def test_pyarrow_fs_reads_what_fsspec_wrote(s3_server):
    uri = s3_server.url("storage-test", "pa.bin")
    storage.write_bytes(uri, b"\x00\x01\x02")
    fs, path = storage.pyarrow_fs(uri)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"\x00\x01\x02"


def test_local_paths_and_file_uris(tmp_path):
    p = tmp_path / "x" / "y.txt"
    storage.write_text(str(p), "local")
    assert storage.read_text("file://" + str(p)) == "local"
    assert storage.join("s3://b/p/", "q", "r") == "s3://b/p/q/r"


def test_tokenizer_from_s3_equals_the_local_file(s3_server, tmp_path, monkeypatch):
    """data.tokenizer may be an s3:// URI: every worker of a cluster reads it, none needs a shared disk. The endpoint
    here is the config's alone (none in the environment): the driver's prepare step reads the vocabulary with it."""
    import pytest

    from mirasol_ray.data.text import get_tokenizer, train_bpe_tokenizer
    from mirasol_ray.train.prepare import load_prepared

    text = train_bpe_tokenizer(["a red circle, then a blue square; low, high", "which came first?"] * 10, 300)
    local = tmp_path / "tokenizer.json"
    local.write_text(text)
    uri = s3_server.url("tok", "tokenizer.json")
    storage.write_text(uri, text)
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    storage.configure()  # as a new process starts
    cfg = load_prepared("tiny", [f"storage.endpoint_url={s3_server.endpoint}", f"data.tokenizer={uri}"])
    remote, ref = get_tokenizer(cfg.data.tokenizer), get_tokenizer(str(local))
    sample = "a blue circle, then which came first? Ünseen"
    assert remote.encode(sample) == ref.encode(sample) and remote.vocab_size == ref.vocab_size == cfg.model.vocab_size
    assert remote.decode(remote.encode(sample)) == sample
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: s3://.*/missing.json"):
        get_tokenizer(s3_server.url("tok", "missing.json"))


def test_run_lease_on_s3(s3_server):
    """The run folder's lease works on object storage too: held, refused to a second run, released."""
    import pytest

    from mirasol_ray.launch.lease import LEASE_FILE, RunInUseError, RunLease, lease_token

    run = s3_server.url("lease-test", "run")
    with RunLease(run) as held:
        assert lease_token(run) == held.token
        with pytest.raises(RunInUseError, match=f"run folder {run} is in use"):
            RunLease(run).acquire()
    assert not storage.exists(storage.join(run, LEASE_FILE))


def test_a_sharded_checkpoint_in_s3_is_read_where_it_is(s3_server, tmp_path, fresh_training):
    """A sharded (DCP) checkpoint stored in S3: the whole model for evaluation, export and train.init_from, and a
    resume's model and optimiser state, read from the bucket by byte ranges (nothing downloaded first)."""
    import torch

    from mirasol_ray.bench.step import synthetic_batch
    from mirasol_ray.config import load_config
    from mirasol_ray.train import checkpoint as ckpt
    from mirasol_ray.train import sharded
    from mirasol_ray.train.step import make_scheduler, train_step

    cfg = load_config("tiny", ["train.steps=4", "train.warmup_steps=1"])


    model, opt, sched = fresh_training(cfg)
    batch = synthetic_batch(cfg, 2)
    train_step(model, [batch], opt, sched, cfg.train, torch.device("cpu"))
    local = tmp_path / "checkpoint_1"
    sharded.save(str(local), model, opt)
    ckpt.write_checkpoint(str(local), model, None, None, sched, step=1, run_config=cfg.to_dict(), sharded=True)
    uri = s3_server.url("sharded", "run", "checkpoint_1")
    storage.fsspec_fs(uri).put(str(local) + "/", storage.strip_scheme(uri), recursive=True)
    assert sharded.is_sharded(uri) and storage.exists(storage.join(uri, "__0_0.distcp"))

    ckpt.export(uri, str(tmp_path / "model.pt"))  # the whole model, as evaluation and init_from read it
    exported = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    assert exported.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    resumed, resumed_opt, _ = fresh_training(cfg)
    sharded.load(uri, resumed, resumed_opt)
    after = [train_step(m, [batch], o, s, cfg.train, torch.device("cpu"))["loss"]
             for m, o, s in ((model, opt, sched), (resumed, resumed_opt, make_scheduler(resumed_opt, cfg.train)))]
    assert after[0] == after[1]


def test_a_missing_bucket_is_one_line_naming_it_in_seconds_and_a_good_one_passes(s3_server, capsys):
    """Issue 34: `mirasol results` of a bucket that does not exist on a live S3-compatible server: one line naming
    the bucket and the URL, well within 10 s (no library retries), before anything else runs."""
    import time

    from mirasol_ray.cli import main

    storage.configure()  # the endpoint from the environment the fixture set, as a new process has it
    storage.check_access(s3_server.url("run"))  # the fixture's bucket: answers, nothing raised
    url = "s3://no-such-bucket-h34/run"
    t0 = time.perf_counter()
    assert main(["results", url]) == 2
    took = time.perf_counter() - t0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"mirasol: error: bucket 'no-such-bucket-h34' does not exist at {s3_server.endpoint} ({url})"]
    assert took < 10
