"""Write a synthetic-model spec (llama_core/data/shapes/<name>.json) from a real GGUF header.

    python -m ukgpu.tools.bench.extract_shapes NAME FILE [--source TEXT]

FILE may be the whole model or only a prefix that holds the header (e.g. the
first part of a split download): only the header is read, with every value's
GGUF type, so the synthetic file can repeat the metadata type for type.  The
large tokenizer arrays are not copied into the spec; their length and a
fingerprint are, so the builder can check that a donor model's vocabulary is the
same one.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFValueType

from ukgpu.llama_core.gguf.synthetic import SHAPES_DIR, TOKENIZER_ARRAYS, fingerprint

_FMT = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
        GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
        GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}


class _Header:
    """Sequential little-endian reads of a GGUF header held in memory."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v

    def string(self) -> str:
        n = self.scalar("Q")
        self.pos += n
        return self.buf[self.pos - n : self.pos].decode("utf-8")

    def value(self, vtype: GGUFValueType) -> tuple[Any, str | None]:
        """(value, element type name for arrays)."""
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype == GGUFValueType.ARRAY:
            itype, n = GGUFValueType(self.scalar("I")), self.scalar("Q")
            return [self.value(itype)[0] for _ in range(n)], itype.name
        return self.scalar(_FMT[vtype]), None


def read_header(buf: bytes) -> dict[str, Any]:
    h = _Header(buf)
    if buf[:4] != b"GGUF":
        raise SystemExit("not a GGUF file (bad magic)")
    h.pos = 4
    version, n_tensors, n_kv = h.scalar("I"), h.scalar("Q"), h.scalar("Q")
    metadata = {}
    for _ in range(n_kv):
        key = h.string()
        vtype = GGUFValueType(h.scalar("I"))
        value, sub = h.value(vtype)
        metadata[key] = {"type": vtype.name, "sub_type": sub, "value": value}
    tensors = []
    for _ in range(n_tensors):
        name = h.string()
        dims = [h.scalar("Q") for _ in range(h.scalar("I"))]
        qtype = GGMLQuantizationType(h.scalar("I"))
        h.scalar("Q")  # offset: the writer recomputes it
        tensors.append({"name": name, "type": qtype.name, "shape": list(reversed(dims))})
    return {"gguf_version": version, "metadata": metadata, "tensors": tensors, "header_bytes": h.pos}


def spec_from_header(name: str, header: dict[str, Any], source: str) -> dict[str, Any]:
    md = dict(header["metadata"])
    vocab = {}
    for key in TOKENIZER_ARRAYS:
        if key in md:
            vocab[key] = {"type": md[key]["sub_type"], "length": len(md[key]["value"]),
                          "sha256": fingerprint(md.pop(key)["value"])}
    return {"name": name, "source": source, "gguf_version": header["gguf_version"],
            "header_bytes": header["header_bytes"], "metadata": md, "vocab": vocab, "tensors": header["tensors"]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ukgpu.tools.bench.extract_shapes")
    parser.add_argument("name")
    parser.add_argument("file", type=Path)
    parser.add_argument("--source", default="", help="where the header came from (recorded in the spec)")
    parser.add_argument("--max-bytes", type=int, default=64 * 2**20, help="read at most this much of FILE")
    args = parser.parse_args(argv)
    with open(args.file, "rb") as f:
        buf = f.read(args.max_bytes)
    spec = spec_from_header(args.name, read_header(buf), args.source or args.file.name)
    out = SHAPES_DIR / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec, indent=1, ensure_ascii=False) + "\n")
    print(f"{out}: {len(spec['tensors'])} tensors, {len(spec['metadata'])} metadata keys")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
