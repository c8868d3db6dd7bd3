import gzip
import os
from pathlib import Path

import pytest
import torch

from trainer.data.idx import encode_idx, gunzip, parse_idx, read_idx, write_idx
from trainer.errors import DataError


def shared_data_dir() -> Path:
    env = os.environ.get("TRAINER_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_file(name: str, base: str) -> Path:
    path = shared_data_dir() / name / "raw" / f"{base}.gz"
    if not path.is_file():
        pytest.skip(f"shared dataset file {path} not present")
    return path


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64]
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path, dtype, suffix):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 4, 5, generator=g) * 100).to(dtype)
    path = tmp_path / f"x-idx3{suffix}"
    write_idx(path, t)
    back = read_idx(path)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    if suffix == ".gz":
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_encoding_is_big_endian_canonical():
    raw = encode_idx(torch.tensor([1, 258], dtype=torch.int32))
    assert raw == bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 2])
    t = parse_idx(raw, "x")
    assert t.tolist() == [1, 258]
    t[0] = 7  # the parsed tensor owns writable memory
    assert t.tolist() == [7, 258]


def test_encode_rejects_unsupported_dtype():
    with pytest.raises(TypeError, match="bool"):
        encode_idx(torch.zeros(2, dtype=torch.bool))


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_real_datasets_parse(name):
    for split, n in (("train", 60000), ("t10k", 10000)):
        images = read_idx(shared_file(name, f"{split}-images-idx3-ubyte"))
        labels = read_idx(shared_file(name, f"{split}-labels-idx1-ubyte"))
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.uint8
        assert int(labels.min()) == 0 and int(labels.max()) == 9
        assert torch.bincount(labels.long(), minlength=10).min() > n // 20
        assert int(images.max()) == 255 and int(images.min()) == 0


def _labels_raw() -> bytes:
    return gzip.decompress(shared_file("MNIST", "t10k-labels-idx1-ubyte").read_bytes())


def test_bad_magic():
    raw = b"\x12\x34" + _labels_raw()[2:]
    with pytest.raises(DataError, match=r"labels\.idx.*bad magic number 0x1234.*fetch it again"):
        parse_idx(raw, "labels.idx")


def test_still_compressed_is_explained():
    with pytest.raises(DataError, match="still gzip-compressed"):
        parse_idx(gzip.compress(_labels_raw()), "labels.idx")


def test_unknown_dtype_code():
    raw = bytearray(_labels_raw())
    raw[2] = 0x0A
    with pytest.raises(DataError, match=r"f\.idx.*unknown dtype code 0x0A"):
        parse_idx(bytes(raw), "f.idx")


def test_truncated_data():
    raw = _labels_raw()
    with pytest.raises(DataError, match=r"f\.idx.*truncated data.*\(10000,\)"):
        parse_idx(raw[:-1], "f.idx")


def test_truncated_header():
    with pytest.raises(DataError, match="truncated header"):
        parse_idx(bytes([0, 0, 8, 3, 0, 0]), "f.idx")
    with pytest.raises(DataError, match="fewer than the 4-byte header"):
        parse_idx(b"\x00", "f.idx")


def test_trailing_bytes():
    with pytest.raises(DataError, match="3 trailing bytes"):
        parse_idx(_labels_raw() + b"abc", "f.idx")


def test_wrong_dimension_size():
    raw = bytearray(_labels_raw())
    raw[4:8] = (10001).to_bytes(4, "big")  # header claims one label more than stored
    with pytest.raises(DataError, match="truncated data"):
        parse_idx(bytes(raw), "f.idx")


def test_truncated_gz_file(tmp_path):
    src = shared_file("MNIST", "t10k-labels-idx1-ubyte").read_bytes()
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(DataError, match=rf"{bad.name} is a truncated gzip file.*data.download"):
        read_idx(bad)


def test_corrupt_gz_file(tmp_path):
    src = bytearray(shared_file("MNIST", "t10k-labels-idx1-ubyte").read_bytes())
    src[20:40] = b"\xff" * 20
    bad = tmp_path / "labels.gz"
    bad.write_bytes(bytes(src))
    with pytest.raises(DataError, match=r"labels\.gz is not a valid gzip file"):
        read_idx(bad)
    bad.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_idx(bad)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist.*TRAINER_DATA_DIR"):
        read_idx(tmp_path / "nope.gz")


def test_gunzip_multi_member_and_limit():
    assert gunzip(gzip.compress(b"ab") + gzip.compress(b"cd"), "x") == b"abcd"
    with pytest.raises(DataError, match="more than 100 bytes"):
        gunzip(gzip.compress(b"\x00" * 1000), "bomb", max_size=100)
    assert gunzip(gzip.compress(b"\x00" * 100), "ok", max_size=100) == b"\x00" * 100
