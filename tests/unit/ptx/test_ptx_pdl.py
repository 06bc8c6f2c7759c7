"""Every shipped kernel keeps the contract of programmatic dependent launch (ptx_kernels/pdl.py).

Reads the built PTX and manifests (ptx_kernels/build).  An sm_90a entry says `"pdl": true` and
its code lets the next kernel launch and then waits for the one before it
(`griddepcontrol.launch_dependents`, `griddepcontrol.wait`) before it can touch global memory:
no global, generic or asynchronous load or store, atomic or branch comes ahead of the wait.
The launcher adds the PDL attribute to exactly these entries; one that read an activation before
the wait would race with the kernel writing it, which no numerical test on a stand-in would see.
The portable sm_80 PTX (no `griddepcontrol` before sm_90) has neither the instructions nor the
flag.
"""

import json
import re

import pytest

from ukgpu.ptx_kernels.loader import BUILD_DIR

# what may not come before the wait: memory ops other than shared/param/local, and control flow
BEFORE_WAIT = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:(?:ld|st|atom|red|cp\.async|prefetch|prefetchu)"
                         r"(?!\.param|\.shared|\.local)\b|bra\b|call\b|ret\b)")


def _manifest(target: str) -> dict:
    return json.loads((BUILD_DIR / target / "manifest.json").read_text())["entries"]


def _body(ptx: str) -> list[str]:
    """The instructions of the (one) entry function, from its opening brace."""
    lines = ptx.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(".visible .entry"))
    brace = next(i for i in range(start, len(lines)) if lines[i].strip() == "{")
    return [ln for ln in lines[brace + 1:] if ln.strip() and not ln.strip().startswith("//")]


SM90 = _manifest("sm_90a")


def test_every_entry_is_gated_on_sm90a_and_none_on_sm80():
    assert SM90 and all(e["pdl"] and e["constexprs"]["PDL"] is True for e in SM90.values())
    sm80 = _manifest("sm_80")
    assert sm80.keys() == SM90.keys()
    assert not any(e["pdl"] or e["constexprs"]["PDL"] for e in sm80.values())
    for name, e in sm80.items():
        ptx = (BUILD_DIR / "sm_80" / e["artifacts"]["ptx"]["file"]).read_text()
        assert "griddepcontrol" not in ptx, name


@pytest.mark.parametrize("name", sorted(SM90))
def test_the_wait_comes_before_any_global_access(name):
    ptx = (BUILD_DIR / "sm_90a" / SM90[name]["artifacts"]["ptx"]["file"]).read_text()
    body = _body(ptx)
    trigger = next(i for i, ln in enumerate(body) if "griddepcontrol.launch_dependents" in ln)
    wait = next(i for i, ln in enumerate(body) if "griddepcontrol.wait" in ln)
    assert trigger < wait
    early = [ln.strip() for ln in body[:wait] if BEFORE_WAIT.match(ln)]
    assert not early, f"before griddepcontrol.wait: {early}"


def test_the_pattern_catches_what_it_must():
    bad = ["\tld.global.v4.b32 \t{%r1, %r2, %r3, %r4}, [%rd1];", "\t@%p1 st.global.b32 [%rd2], %r1;",
           "\tld.b32 %r1, [%rd1];", "\tbra.uni \t$L__BB0_2;", "\tatom.global.add.f32 %f1, [%rd1], %f2;",
           "\tcp.async.cg.shared.global [%r1], [%rd1], 16;"]
    ok = ["\tld.param.b64 \t%rd3, [k_param_0];", "\tst.shared.b32 [%r1], %r2;", "\tmov.u32 %r4, %ctaid.x;",
          "\tgriddepcontrol.wait ;"]
    assert all(BEFORE_WAIT.match(x) for x in bad)
    assert not any(BEFORE_WAIT.match(x) for x in ok)
