"""Run a ukgpu command against the stand-in libcuda.so.1:

    LD_LIBRARY_PATH=DIR UKGPU_CUDA_STUB=DIR python tests/cuda_stub/run.py verify -m smollm2-135m

Exits with the command's status; a Python error inside the stub turns a 0 into 3, so a silent
failure below the bindings cannot pass for success.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from libcuda_stub import install  # noqa: E402


def main() -> int:
    stub = install()
    from ukgpu.tools.cli import main as cli

    try:
        code = cli(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    calls = ", ".join(f"{k}={v}" for k, v in sorted(stub.calls.items()))
    print(f"libcuda stub: {sum(stub.calls.values())} driver calls ({calls})", file=sys.stderr)
    if stub.errors:
        print(f"libcuda stub: {len(stub.errors)} error(s) inside the stub", file=sys.stderr)
        return code or 3
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
