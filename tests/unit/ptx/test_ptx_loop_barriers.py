"""The shipped one-row (b1) mat-vec kernels stream without block barriers in their K loops.

Reads the built sm_90a PTX (ptx_kernels/build): every loop of every b1 mat-vec entry (plain,
norm, q/k/v, GLU, residual add, split-K) is free of `bar.sync` and shared memory, and each
entry's weight loop loads 16 bytes at a time (`ld.global.v4`).  The kernels built before
`ptx_kernels/row_dot.py` had 8 barriers and 4-8 shared-memory round trips a K step (a layout
conversion between the quants' and x's registers), which this test rejects.
"""

import re

import pytest

from ukgpu.ptx_kernels.loader import BUILD_DIR

B1 = re.compile(r"^matvec_(?:(?:norm|glu|add|qkv|split_add)_)?[a-z0-9_]+_b1$")
LABEL = re.compile(r"^(\$L__BB\d+_\d+):")


def _entries() -> list[str]:
    names = sorted(p.stem for p in (BUILD_DIR / "sm_90a").glob("matvec*_b1.ptx"))
    return [n for n in names if B1.match(n)]


def loops(ptx: str) -> list[list[str]]:
    """Bodies of the loops: from a label to the last branch back to it."""
    lines = ptx.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = LABEL.match(line)
        if not m:
            continue
        back = [j for j in range(i + 1, len(lines))
                if re.search(r"\bbra(?:\.uni)?\s+" + re.escape(m.group(1)) + ";", lines[j])]
        if back:
            out.append(lines[i:back[-1] + 1])
    return out


def test_the_b1_entries_are_all_there():
    names = _entries()
    assert len(names) == 13 * 6, names  # 13 types x (plain, norm, glu, add, qkv, split_add)


@pytest.mark.parametrize("name", _entries())
def test_no_barrier_or_shared_memory_in_the_k_loop(name):
    ptx = (BUILD_DIR / "sm_90a" / f"{name}.ptx").read_text()
    bodies = loops(ptx)
    assert bodies, "no loop found"
    for body in bodies:
        text = "\n".join(body)
        assert "bar.sync" not in text and ".shared" not in text, f"{name}: {body[0]}"
    weight_loop = max(bodies, key=len)
    assert any("ld.global.v4" in line for line in weight_loop), f"{name}: no 16-byte load"
