"""The ChatterBot English corpus as question -> answer pairs, offline.

Source: the PyPI package `chatterbot-corpus==1.3.3` (BSD-3-Clause), fetched
with `pip download --no-deps` (never installed: only its YAML files are read,
straight from the wheel) and verified by the wheel's SHA-256. Its English part
is 21 files, 2,025 conversations (one malformed entry skipped), 2,306
pairs of consecutive turns.

Held-out pairs are split by question, not by pair: the corpus often gives one
question several answers, and a validation pair whose question the model saw
in training would measure memorization, not held-out loss.

Preference pairs are built, because no real preference set is available
offline: `chosen` is the corpus' answer to the question, `rejected` the answer
to a different question (and a different answer text) drawn by seed from the
same split. This teaches relevance, not human taste; bring real pairs as JSONL.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from trainer.errors import DataError

CHATTERBOT_REQUIREMENT = "chatterbot-corpus==1.3.3"
CHATTERBOT_WHEEL = "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
CHATTERBOT_WHEEL_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
CHATTERBOT_MEMBERS = "chatterbot_corpus/data/english/"
# Module-level so tests (or unusual machines) can repoint it; "-d DEST" is appended.
PIP_DOWNLOAD_COMMAND: list[str] = [
    sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
    "--disable-pip-version-check", "--no-input", "-q", CHATTERBOT_REQUIREMENT,
]  # fmt: skip
PIP_TIMEOUT_S = 300.0

Pair = tuple[str, str, str]  # (question, answer, source "english/<file>.yml #<conversation>")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_chatterbot_wheel(cache_dir: str | Path) -> Path:
    """The verified wheel in `cache_dir`, downloaded with pip when missing."""
    cache_dir = Path(cache_dir)
    wheel = cache_dir / CHATTERBOT_WHEEL
    if wheel.is_file() and _sha256(wheel) == CHATTERBOT_WHEEL_SHA256:
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chatterbot-", dir=cache_dir) as tmp:
        cmd = [*PIP_DOWNLOAD_COMMAND, "-d", tmp]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"cannot fetch {CHATTERBOT_REQUIREMENT}: {e}") from e
        got = Path(tmp) / CHATTERBOT_WHEEL
        if proc.returncode != 0 or not got.is_file():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
            raise DataError(
                f"cannot fetch {CHATTERBOT_REQUIREMENT} with pip download ({tail or 'no wheel'}); "
                f"put {CHATTERBOT_WHEEL} in {cache_dir} by hand"
            )
        actual = _sha256(got)
        if actual != CHATTERBOT_WHEEL_SHA256:
            raise DataError(
                f"{CHATTERBOT_WHEEL} has SHA-256 {actual}, expected {CHATTERBOT_WHEEL_SHA256}"
            )
        shutil.move(str(got), wheel)  # same filesystem: an atomic rename
    return wheel


def read_conversations(wheel: str | Path) -> list[tuple[str, list[str]]]:
    """(source, turns) for every English conversation, in file order."""
    import yaml

    conversations = []
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(
            n for n in zf.namelist() if n.startswith(CHATTERBOT_MEMBERS) and n.endswith(".yml")
        )
        for name in names:
            doc = yaml.safe_load(zf.read(name).decode("utf-8"))
            short = name[len(CHATTERBOT_MEMBERS) :]
            for i, turns in enumerate(doc.get("conversations") or []):
                # One entry (trivia.yml #13) is a lone string, a YAML slip: skip it.
                if isinstance(turns, list) and len(turns) >= 2:
                    conversations.append((f"english/{short} #{i}", [str(t) for t in turns]))
    if not conversations:
        raise DataError(f"{wheel}: no conversations under {CHATTERBOT_MEMBERS}")
    return conversations


def conversation_pairs(conversations: list[tuple[str, list[str]]]) -> list[Pair]:
    """Every two consecutive turns are a question and its answer."""
    return [
        (turns[i].strip(), turns[i + 1].strip(), source)
        for source, turns in conversations
        for i in range(len(turns) - 1)
    ]


def normalize(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?!. ")


def split_pairs(pairs: list[Pair], split: str, val_size: float, split_seed: int) -> list[Pair]:
    """The pairs of one split ("all", "train", "val"), held out by question.

    `val_size` is a fraction of the distinct questions (< 1) or their number (>= 1).
    """
    if split == "all":
        return list(pairs)
    if split not in ("train", "val"):
        raise DataError(f"data split={split!r} is unknown; choose all, train or val")
    questions = sorted({normalize(q) for q, _, _ in pairs})
    n_val = round(val_size * len(questions)) if val_size < 1 else int(val_size)
    if not 0 < n_val < len(questions):
        raise DataError(
            f"val_size={val_size} holds out {n_val} of {len(questions)} questions; "
            "choose a fraction in (0, 1) or a count in [1, number of questions)"
        )
    random.Random(split_seed).shuffle(questions)
    held_out = set(questions[:n_val])
    return [p for p in pairs if (normalize(p[0]) in held_out) == (split == "val")]


def preference_triples(pairs: list[Pair], pair_seed: int) -> list[tuple[str, str, str]]:
    """(question, chosen, rejected): rejected is drawn by seed from the answers to other
    questions, and is never any answer the corpus gives to this question."""
    answers: dict[str, set[str]] = {}
    for question, answer, _ in pairs:
        answers.setdefault(normalize(question), set()).add(normalize(answer))
    rng = random.Random(pair_seed)
    triples = []
    for question, answer, _ in pairs:
        own = answers[normalize(question)]
        for _ in range(1000):
            other_q, other_a, _ = pairs[rng.randrange(len(pairs))]
            if normalize(other_q) != normalize(question) and normalize(other_a) not in own:
                break
        else:
            raise DataError(f"no answer to another question found for {question!r}")
        triples.append((question, answer, other_a))
    return triples
