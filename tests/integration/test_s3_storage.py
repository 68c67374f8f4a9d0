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
