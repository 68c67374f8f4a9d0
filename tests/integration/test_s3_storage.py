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


def test_tokenizer_from_s3_equals_the_local_file(s3_server, tmp_path):
    """data.tokenizer may be an s3:// URI: every worker of a cluster reads it, none needs a shared disk."""
    import pytest

    from mirasol_ray.data.text import get_tokenizer, train_bpe_tokenizer

    text = train_bpe_tokenizer(["a red circle, then a blue square; low, high", "which came first?"] * 10, 300)
    local = tmp_path / "tokenizer.json"
    local.write_text(text)
    uri = s3_server.url("tok", "tokenizer.json")
    storage.write_text(uri, text)
    remote, ref = get_tokenizer(uri), get_tokenizer(str(local))
    sample = "a blue circle, then which came first? Ünseen"
    assert remote.encode(sample) == ref.encode(sample) and remote.vocab_size == ref.vocab_size
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
