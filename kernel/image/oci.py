"""OCI image layouts written by Python alone: no container daemon, no registry, no extra tool.

A layout folder (OCI image-layout spec 1.0) holds:

    oci-layout       {"imageLayoutVersion": "1.0.0"}
    index.json       one manifest descriptor per image, named by `org.opencontainers.image.ref.name`
    blobs/sha256/    every layer, config and manifest, each named by the SHA-256 of its bytes

Copy one image to a registry with any OCI tool (`skopeo copy oci:DIR:NAME docker://HOST/REPO:TAG`,
`oras cp --from-oci-layout DIR:NAME ...`, `crane push DIR ...`).

Reproducible like the image itself: each layer is one tar with its entries sorted by path, every
mtime `$SOURCE_DATE_EPOCH` (or 0), no user or group names, owners as given per file; gzip layers
carry no name and mtime 0; JSON is written with sorted keys and no creation time.  The same
files give the same digests on any host.  Layers are streamed (a 400 MiB initramfs is never held
in memory): tar -> SHA-256 of the tar (the config's diff_id) -> optional gzip -> SHA-256 of the
blob -> the file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ukgpu.llama_core.errors import UkgpuError

LAYOUT_VERSION = "1.0.0"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = MEDIA_LAYER + "+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20


class OciError(UkgpuError):
    """An OCI layout cannot be written or read back."""


@dataclass(frozen=True)
class FileEntry:
    """One regular file of a layer: `path` inside the image (no leading slash), its host source."""

    path: str
    source: Path
    uid: int = 0
    gid: int = 0
    mode: int = 0o444


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict:
        doc: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc


class _Tee:
    """A write-only file object that hashes what passes through and counts it."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()


def source_date_epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


class Layout:
    """An OCI layout folder being written: blobs first, `finish` writes index.json last."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests: list[Descriptor] = []

    def add_bytes(self, data: bytes, media_type: str) -> Descriptor:
        hexdigest = hashlib.sha256(data).hexdigest()
        path = self.blobs / hexdigest
        if not path.exists() or path.stat().st_size != len(data):
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(path)
        return Descriptor(media_type, f"sha256:{hexdigest}", len(data))

    def add_json(self, doc: dict, media_type: str) -> Descriptor:
        return self.add_bytes(canonical_json(doc), media_type)

    def add_layer(self, files: list[FileEntry], dirs: dict[str, tuple[int, int, int]],
                  compress: bool = False) -> tuple[Descriptor, str]:
        """One tar layer of `files` and `dirs` (path -> (uid, gid, mode)); returns its descriptor
        and its diff_id (the digest of the uncompressed tar)."""
        tmp = self.blobs / ".layer.part"
        with open(tmp, "wb") as out:
            blob = _Tee(out)
            if compress:
                with gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0) as zipped:
                    diff = _Tee(zipped)  # type: ignore[arg-type]
                    _write_tar(diff, files, dirs)
            else:
                diff = blob
                _write_tar(diff, files, dirs)
        digest = blob.sha.hexdigest()
        tmp.replace(self.blobs / digest)
        media = MEDIA_LAYER_GZIP if compress else MEDIA_LAYER
        return Descriptor(media, f"sha256:{digest}", blob.size), f"sha256:{diff.sha.hexdigest()}"

    def add_image(self, name: str, layers: list[tuple[Descriptor, str]],
                  annotations: dict[str, str], labels: dict[str, str] | None = None) -> Descriptor:
        """Config + manifest for `layers`; the manifest is listed in index.json under `name`."""
        config = {"architecture": "amd64", "os": "linux",
                  "config": {"Labels": dict(labels or {})},
                  "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]}}
        config_desc = self.add_json(config, MEDIA_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_desc.to_json(),
                    "layers": [desc.to_json() for desc, _ in layers], "annotations": dict(annotations)}
        desc = self.add_json(manifest, MEDIA_MANIFEST)
        named = Descriptor(desc.media_type, desc.digest, desc.size, {REF_NAME: name})
        self.manifests = [m for m in self.manifests if (m.annotations or {}).get(REF_NAME) != name]
        self.manifests.append(named)
        return named

    def finish(self) -> None:
        (self.root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX,
                 "manifests": [m.to_json() for m in sorted(self.manifests, key=_ref_name)]}
        (self.root / "index.json").write_bytes(canonical_json(index))


def _ref_name(desc: Descriptor) -> str:
    return (desc.annotations or {}).get(REF_NAME, "")


def canonical_json(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _write_tar(sink: _Tee, files: list[FileEntry], dirs: dict[str, tuple[int, int, int]]) -> None:
    mtime = source_date_epoch()
    entries: list[tuple[str, FileEntry | tuple[int, int, int]]] = [(d.strip("/"), dirs[d]) for d in dirs]
    entries += [(f.path.strip("/"), f) for f in files]
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise OciError(f"a layer lists a path twice: {sorted(n for n in names if names.count(n) > 1)}")
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for name, what in sorted(entries):
            info = tarfile.TarInfo(name)
            info.mtime, info.uname, info.gname = mtime, "", ""
            if isinstance(what, FileEntry):
                info.uid, info.gid, info.mode = what.uid, what.gid, what.mode
                info.size = what.source.stat().st_size
                with open(what.source, "rb") as src:
                    tar.addfile(info, src)
            else:
                info.type = tarfile.DIRTYPE
                info.uid, info.gid, info.mode = what
                tar.addfile(info)


def read_index(root: Path) -> dict[str, dict]:
    """name -> manifest of every image in the layout at `root`, each blob checked against its
    digest and size on the way (OciError says which one is wrong)."""
    root = Path(root)
    layout = json.loads((root / "oci-layout").read_text())
    if layout.get("imageLayoutVersion") != LAYOUT_VERSION:
        raise OciError(f"{root}: oci-layout says {layout}, expected version {LAYOUT_VERSION}")
    index = json.loads((root / "index.json").read_text())
    out: dict[str, dict] = {}
    for desc in index["manifests"]:
        manifest = json.loads(read_blob(root, desc))
        for child in [manifest["config"], *manifest["layers"]]:
            check_blob(root, child)
        out[desc.get("annotations", {}).get(REF_NAME, desc["digest"])] = manifest
    return out


def blob_path(root: Path, desc: dict) -> Path:
    algo, _, hexdigest = desc["digest"].partition(":")
    return Path(root) / "blobs" / algo / hexdigest


def read_blob(root: Path, desc: dict) -> bytes:
    data = blob_path(root, desc).read_bytes()
    if len(data) != desc["size"] or f"sha256:{hashlib.sha256(data).hexdigest()}" != desc["digest"]:
        raise OciError(f"blob {desc['digest']} does not match its descriptor: rewrite the layout")
    return data


def check_blob(root: Path, desc: dict) -> None:
    """Stream a (large) blob through SHA-256 and compare digest and size with `desc`."""
    path = blob_path(root, desc)
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    if size != desc["size"] or f"sha256:{sha.hexdigest()}" != desc["digest"]:
        raise OciError(f"blob {desc['digest']} ({path}) does not match its descriptor: rewrite the layout")
