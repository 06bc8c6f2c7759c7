"""Tune the mat-vec and GEMM kernels' launch geometry on a GPU: build variants here, time them there.

    python3 tools/dev/kernel_sweep.py build -o build/kit/variants        # here, seconds a variant
    python3 tools/dev/kernel_sweep.py run -d build/kit/variants -o OUT   # on the GPU machine
    python3 tools/dev/kernel_sweep.py run -o OUT   # the shipped build and its environment variants

`build` compiles the `matvec_fused` entries (norm, glu, add, qkv) of the weight types the benchmark
models use with other (BLOCK_N, BLOCK_K, num_warps, num_stages), one folder per variant holding an
sm_90a manifest: the changed entries' cubins, every other entry pointing back at the shipped build
(`ptx_kernels/build`), so a variant is a few hundred KiB.  A variant may change the one-row (b1) and
the batch (b8) entries at once: tg128 measures the first, the 4-sequence step the second.  A GEMM
variant (`gemm-*`) rebuilds the prefill GEMM entries (plain and fused) with another (BLOCK_M,
BLOCK_N, BLOCK_K, num_warps, num_stages): pp512 measures it.

`build --rev REV` makes a variant of the kernels as commit REV built them (`rev-REV`): the entries
whose artifacts differ from the shipped build are taken from git (REV's sm_90a cubins, not rebuilt),
the rest point back at the shipped build, so the kernels before a change are timed beside it in the
same run, on the same card.  Built variants carry cubins only (the H200 loads the sm_90a cubin; the
PTX would double their size against the 64 MiB a GPU-machine call may send).

`run` loads each synthetic model once per variant in its own process (`UKGPU_KERNELS_DIR` points
the loader at the variant) and measures pp512 (a 512-token prompt), greedy tg128 through the
decode graph and 4 sequences through the batch graph, median of 3, the shipped build first and
last (drift check); each variant's 128 greedy tokens are compared with the shipped build's (same
arithmetic order per row, so the tokens match unless a kernel is wrong; another geometry may sum
in another order, so random-weight models can part late), and the top-8 logits of the first decode
step and of the prompt's last position.  Results: OUT/sweep.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "ptx_kernels" / "build"
TYPES = ("Q4_K", "Q6_K", "Q4_1", "Q8_0")  # the synthetic Qwen2.5-1.5B and SmolLM2-135M matrices
MODELS = ("qwen2.5-coder-1.5b", "smollm2-135m")
N_CTX, LONG, PP = 2048, 1024, 512  # the server's default context; the prompt before the
# long-context decode; the prompt timed as pp
# runs of the shipped kernels with environment variables set (gpu/cuda/fused_ops.py): "old" is the
# decode step before issue 18 (down projection in one pass, the output matrix recomputing the
# norm); "split2048" turns the split-K down projection on (off by default until measured), and
# "fusednorm" with it undoes the normed output row; "split512" also splits the o projection
# (1.5B) and SmolLM2's down projection; "prefill-plain" runs the prefill as before the fused
# GEMMs (rmsnorm, GEMMs, bias adds, swiglu and residual adds as separate launches); "no-pdl"
# launches every kernel without programmatic dependent launch (ptx_kernels/pdl.py), as before it.
# (The decode attention's keys per split, UKGPU_DECODE_SPLIT_KEYS, were swept the same way: 64
# was taken.)
ENV_VARIANTS = {
    "no-pdl": {"UKGPU_PDL": "0"},
    "prefill-plain": {"UKGPU_FUSED_GEMM": "0"},
    "old": {"UKGPU_SPLIT_K_COLUMNS": "0", "UKGPU_NORMED_OUTPUT": "0"},
    "split2048": {"UKGPU_SPLIT_K_COLUMNS": "2048"},
    "fusednorm": {"UKGPU_SPLIT_K_COLUMNS": "2048", "UKGPU_NORMED_OUTPUT": "0"},
    "split512": {"UKGPU_SPLIT_K_COLUMNS": "512"},
}
# variant -> {version: (BLOCK_N, BLOCK_K, num_warps, num_stages)}; BLOCK_B stays (1 or 8), and a
# version the variant does not name keeps the shipped entries.
# The one-row geometries of the barrier-free loop (ptx_kernels/row_dot.py; shipped: 4, 1024, 4, 1):
# fewer round trips a row (k2048: K = 1,536 in one step, 32 bytes of quants a thread), the old
# step (k512: 8-byte loads, 3 steps), more rows a program (n8k512), smaller programs (n2w2), and
# whether Triton pipelines the now-contiguous loads (s2); b8 as shipped.  The geometries swept
# with the loop before it are in docs/benchmarks/cuda.md.
VARIANTS: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "k2048": {"b1": (4, 2048, 4, 1)},
    "k512": {"b1": (4, 512, 4, 1)},
    "n8k512": {"b1": (8, 512, 4, 1)},
    "n2w2": {"b1": (2, 1024, 2, 1)},
    "s2": {"b1": (4, 1024, 4, 2)},
}


# The prefill GEMM's tiles (ptx_kernels/gemm.py; shipped: BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64,
# 4 warps, 3 stages, never swept on a GPU): pp512 is where llama.cpp is ahead (0.82x SmolLM2,
# 0.95x the 1.5B on the H200).  Variant -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the
# tiles Hopper's wgmma favours (128 x 128, 8 warps), larger M or N tiles (more x rows a dequantized
# W tile, more W rows an x tile), the shipped tile over 8 warps (it holds 146-161 registers a
# thread at 4 warps: 3 programs a SM), shorter K steps with deeper pipelining, and a smaller M
# for SmolLM2's 576-wide matrices (72 programs of 64 x 64 at M = 512 on 132 SMs).  Variants of
# 4 warps with larger tiles reach 216-255 registers, one with a stack frame: left out.
GEMM_VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "gemm-m128n128w8": (128, 128, 64, 8, 3),
    "gemm-m128n64w8": (128, 64, 64, 8, 3),
    "gemm-m64n128w8": (64, 128, 64, 8, 3),
    "gemm-w8": (64, 64, 64, 8, 3),
    "gemm-k32s4": (64, 64, 32, 4, 4),
    "gemm-m32n64": (32, 64, 64, 4, 3),
}


def _gemm_variant_spec(spec, geom: tuple[int, int, int, int, int]):
    """A `gemm` or `gemm_fused` spec at another tile; the GLU's two accumulators take half the
    tile's columns each (its shipped rule: one tile's registers)."""
    bm, bn, bk, warps, stages = geom
    c = spec.constexprs
    if spec.name.startswith("gemm_glu_"):
        bn = max(16, bn // 2)
    grid = (spec.grid[0].replace(f", {c['BLOCK_M']})", f", {bm})"),
            spec.grid[1].replace(f", {c['BLOCK_N']})", f", {bn})"), *spec.grid[2:])
    return replace(spec, constexprs={**c, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                   num_warps=warps, num_stages=stages, grid=grid)


def _variant_spec(spec, geom: tuple[int, int, int, int]):
    bn, bk, warps, stages = geom
    old = spec.constexprs["BLOCK_N"]
    grid = (spec.grid[0].replace(f", {old})", f", {bn})"),) + tuple(spec.grid[1:])
    return replace(spec, constexprs={**spec.constexprs, "BLOCK_N": bn, "BLOCK_K": bk},
                   num_warps=warps, num_stages=stages, grid=grid)


def build_variant(name: str, geoms: dict | tuple, out: Path) -> dict:
    """out/<name>/sm_90a/manifest.json: the shipped sm_90a manifest with the matvec_fused entries
    (a GEMM variant: the gemm and gemm_fused entries) of TYPES rebuilt at the variant's geometry (an entry that
    does not compile keeps the shipped one)."""
    from ukgpu.ptx_kernels.catalog import all_specs
    from ukgpu.ptx_kernels.generate import TARGETS, build_entry

    target = next(t for t in TARGETS if t.name == "sm_90a")
    shipped = json.loads((SHIPPED / "sm_90a" / "manifest.json").read_text())
    tdir = out / name / "sm_90a"
    tdir.mkdir(parents=True, exist_ok=True)
    entries = {ename: _pointing_back(ent, tdir) for ename, ent in shipped["entries"].items()}
    failed = []
    for spec in all_specs():
        version = spec.name.rsplit("_", 1)[-1]
        if spec.qtype not in TYPES:
            continue
        if isinstance(geoms, tuple):  # a GEMM tile
            if spec.family not in ("gemm", "gemm_fused"):
                continue
            changed = _gemm_variant_spec(spec, geoms)
        elif spec.family != "matvec_fused" or version not in geoms:
            continue
        else:
            changed = _variant_spec(spec, geoms[version])
        try:
            entries[spec.name] = _cubin_only(build_entry(changed, target, tdir), tdir)
        except Exception as exc:  # noqa: BLE001 - a geometry Triton refuses is a result, not a crash
            failed.append(f"{spec.name}: {type(exc).__name__}: {str(exc)[:200]}")
    (tdir / "manifest.json").write_text(json.dumps({**shipped, "entries": entries}, indent=1) + "\n")
    return {"variant": name, "geometry": geoms, "failed": failed}


def _cubin_only(entry: dict, tdir: Path) -> dict:
    """The entry without its PTX (file removed): a variant runs on the card its cubins were built for."""
    ptx = entry["artifacts"].pop("ptx", None)
    if ptx is not None:
        (tdir / ptx["file"]).unlink(missing_ok=True)
    return entry


def _pointing_back(entry: dict, tdir: Path) -> dict:
    back = os.path.relpath(SHIPPED / "sm_90a", tdir)
    return {**entry, "artifacts": {k: {**a, "file": f"{back}/{a['file']}"}
                                   for k, a in entry["artifacts"].items()}}


def _arguments(entry: dict) -> list[tuple]:
    """What the host passes (name, type, hidden); alignment the other build assumed is checked at its
    launches from its own entry."""
    return [(p["name"], p["type"], p["hidden"]) for p in entry["params"]]


def variant_from_manifest(name: str, before: dict, read: Callable[[str], bytes], out: Path,
                          types: tuple[str, ...] = TYPES) -> dict:
    """out/<name>/sm_90a: the shipped build with every entry of `types` (weight types; entries with
    none too) whose artifacts differ in `before` (an sm_90a manifest of another build) replaced by
    that build's cubin, read(file) giving its bytes.
    An entry whose argument list differs is kept as shipped and reported: the host passes the
    shipped arguments, so the other kernel could not be launched the same way."""
    shipped = json.loads((SHIPPED / "sm_90a" / "manifest.json").read_text())
    if before.get("format") != shipped.get("format") or before.get("arch") != shipped.get("arch"):
        raise SystemExit(f"{name}: manifest format/arch {before.get('format')}/{before.get('arch')} "
                         f"is not the shipped {shipped.get('format')}/{shipped.get('arch')}")
    tdir = out / name / "sm_90a"
    tdir.mkdir(parents=True, exist_ok=True)
    entries, taken, kept = {}, [], []
    for ename, ent in shipped["entries"].items():
        old = before["entries"].get(ename)
        entries[ename] = _pointing_back(ent, tdir)
        if old is None or old["artifacts"] == ent["artifacts"] or (ent.get("qtype") or None) not in (None, *types):
            continue
        if _arguments(old) != _arguments(ent) or "cubin" not in old["artifacts"]:
            kept.append(f"{ename}: {'no cubin' if 'cubin' not in old['artifacts'] else 'arguments differ'}")
            continue
        art = old["artifacts"]["cubin"]
        data = read(art["file"])
        if hashlib.sha256(data).hexdigest() != art["sha256"]:
            raise SystemExit(f"{name}: {art['file']} does not match its manifest's sha256")
        (tdir / art["file"]).write_bytes(data)
        entries[ename] = {**old, "artifacts": {"cubin": art}}
        taken.append(ename)
    (tdir / "manifest.json").write_text(json.dumps({**shipped, "entries": entries}, indent=1) + "\n")
    return {"variant": name, "taken": taken, "kept_shipped": kept, "failed": []}


def variant_from_rev(rev: str, out: Path) -> dict:
    """Variant rev-<rev>: the kernels as commit `rev` built them (its tracked sm_90a build)."""
    def show(path: str) -> bytes:
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:ptx_kernels/build/sm_90a/{path}"],
                              capture_output=True)
        if done.returncode != 0:
            raise SystemExit(f"rev-{rev}: git show {rev}:ptx_kernels/build/sm_90a/{path} failed: "
                             f"{done.stderr.decode(errors='replace').strip()[:300]}")
        return done.stdout

    return variant_from_manifest(f"rev-{rev}", json.loads(show("manifest.json")), show, out)


def cmd_build(args: argparse.Namespace) -> int:
    import tempfile

    every = {**VARIANTS, **GEMM_VARIANTS}
    names = args.only.split(",") if args.only else ([] if args.rev else list(every))
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}: {', '.join(every)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = []
    for rev in args.rev:
        report.append(variant_from_rev(rev, args.out))
        print(f"rev-{rev}: {len(report[-1]['taken'])} entries from {rev}, "
              f"{len(report[-1]['kept_shipped'])} kept as shipped", flush=True)
        for line in report[-1]["kept_shipped"]:
            print("   ", line)
    with tempfile.TemporaryDirectory(prefix="ukgpu-sweep-") as cache:
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DISABLE_LINE_INFO="1")
        for name in names:
            t = time.perf_counter()
            report.append(build_variant(name, every[name], args.out))
            print(f"{name}: {time.perf_counter() - t:.0f} s, {len(report[-1]['failed'])} failed",
                  flush=True)
            for line in report[-1]["failed"]:
                print("   ", line)
    index = args.out / "variants.json"  # every build so far, the newest of each name
    built = json.loads(index.read_text()) if index.is_file() else []
    names_now = {r["variant"] for r in report}
    index.write_text(json.dumps([r for r in built if r["variant"] not in names_now] + report, indent=1) + "\n")
    return 0


def measure(model_name: str, repeats: int, n_gen: int) -> dict:
    """One model on the loader's current kernels, caches of the server's default 2048 rows in 4
    slots: tg (greedy from position 0, graph), 4 sequences batched, greedy after a 1024-token
    prompt (where the split-K attention's keys per split show), and pp: a 512-token prompt into an
    empty cache, the last position's logits copied back (the prefill GEMMs' tiles show there)."""
    import numpy as np

    from ukgpu.gpu.cuda.select import create_backend
    from ukgpu.llama_core.gguf.file import open_gguf
    from ukgpu.llama_core.gguf.synthetic import build_synthetic
    from ukgpu.llama_core.model import Model

    gguf = open_gguf(build_synthetic(model_name))
    be = create_backend(gguf=gguf, n_ctx=N_CTX, n_slots=4)
    model = Model(gguf, be)
    kvs = [model.new_kv(N_CTX) for _ in range(4)]

    def greedy(kv, start: int, n: int) -> tuple[float, list[int]]:
        tok, tokens, t = 1, [], time.perf_counter()
        for pos in range(start, start + n):
            tok = be.decode_greedy(model, tok, pos, kv)
            tokens.append(tok)
        return time.perf_counter() - t, tokens

    greedy(kvs[0], 0, 1)  # eager step + capture
    runs = [greedy(kvs[0], 0, n_gen) for _ in range(repeats)]
    toks = np.ones(4, dtype=np.int64)
    first = be.decode_batch(model, toks, [0] * 4, kvs)[0]
    top = np.argsort(first)[::-1][:8]
    batch = []
    for _ in range(repeats):
        t = time.perf_counter()
        for pos in range(n_gen // 2):
            toks = be.decode_batch(model, toks, [pos] * 4, kvs).argmax(axis=1)
        batch.append(time.perf_counter() - t)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, LONG)
    model.forward(prompt, 0, kvs[1], all_logits=False)
    long = [greedy(kvs[1], LONG, n_gen // 2) for _ in range(repeats)]
    last = model.forward(prompt[:PP], 0, kvs[2], all_logits=False)[0]  # untimed: modules load
    pp = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.forward(prompt[:PP], 0, kvs[2], all_logits=False)  # ends with a device->host copy
        pp.append(time.perf_counter() - t)
    pp_top = np.argsort(last)[::-1][:8]
    host = _prefill_host_share(be, lambda: model.forward(prompt[:PP], 0, kvs[2], all_logits=False))
    return {"tg": n_gen / statistics.median(r[0] for r in runs),
            f"pp{PP}": PP / statistics.median(pp), f"pp{PP}_host": host,
            "pp_top8": [[int(i), float(last[i])] for i in pp_top],
            "b4": 4 * (n_gen // 2) / statistics.median(batch),
            f"tg@{LONG}": (n_gen // 2) / statistics.median(r[0] for r in long),
            "tokens": runs[0][1], "tokens_long": long[0][1],
            "top8": [[int(i), float(first[i])] for i in top]}


def _prefill_host_share(be, forward) -> dict:
    """One more prefill with every kernel launch timed on the host: launches, the host's time
    inside them and the whole forward's wall time.  Launches taking most of the wall time mean the
    prefill waits on Python, not on the GPU: a faster GEMM tile cannot show there."""
    inner, spent, count = be.kernels.launch, [0.0], [0]

    def timed(*args, **kw):
        t = time.perf_counter()
        try:
            return inner(*args, **kw)
        finally:
            spent[0] += time.perf_counter() - t
            count[0] += 1

    be.kernels.launch = timed
    try:
        t = time.perf_counter()
        forward()
        wall = time.perf_counter() - t
    finally:
        del be.kernels.launch  # the set's own method again
    return {"launches": count[0], "launch_ms": round(spent[0] * 1e3, 3), "wall_ms": round(wall * 1e3, 3)}


def cmd_measure(args: argparse.Namespace) -> int:
    res = {m: measure(m, args.repeats, args.n_gen) for m in args.models}
    args.json.write_text(json.dumps(res) + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    variants = sorted(p.name for p in args.dir.iterdir() if (p / "sm_90a" / "manifest.json").is_file()) \
        if args.dir else []
    order = ["shipped", *([] if args.no_env else ENV_VARIANTS), *variants, "shipped"]
    results: list[dict] = []
    for i, name in enumerate(order):
        env = dict(os.environ, PYTHONUNBUFFERED="1", **ENV_VARIANTS.get(name, {}))
        if name != "shipped" and name not in ENV_VARIANTS:
            env["UKGPU_KERNELS_DIR"] = str((args.dir / name).resolve())
        js = args.out / f"sweep-{i}-{name}.json"
        cmd = [sys.executable, __file__, "measure", "--json", str(js), "--repeats", str(args.repeats),
               "--n-gen", str(args.n_gen), "--models", *args.models]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        row = {"variant": name, "seconds": round(time.perf_counter() - t, 1), "exit": done.returncode}
        if done.returncode == 0:
            row["models"] = json.loads(js.read_text())
        else:
            row["error"] = (done.stderr or done.stdout)[-1500:]
        results.append(row)
        (args.out / "sweep.json").write_text(json.dumps(results, indent=1) + "\n")
        print(_line(row, results[0]), flush=True)
    return 0


def _line(row: dict, base: dict) -> str:
    if "models" not in row:
        return f"{row['variant']}: exit {row['exit']}: {row['error'][-300:]}"
    parts = []
    for m, r in row["models"].items():
        ref = base.get("models", {}).get(m, {})
        same = "" if not ref else " " + _agreement(ref, r)
        host = r.get(f"pp{PP}_host")
        share = f" ({host['launches']} launches: {host['launch_ms']:.1f} of {host['wall_ms']:.1f} ms)" if host else ""
        parts.append(f"{m} pp{PP} {r.get(f'pp{PP}', 0):,.0f}{share} tg {r['tg']:,.0f} b4 {r['b4']:,.0f} "
                     f"tg@{LONG} {r[f'tg@{LONG}']:,.0f}{same}")
    return f"{row['variant']:<12} {row['seconds']:5.1f} s | " + " | ".join(parts)


def _agreement(ref: dict, r: dict) -> str:
    """Greedy tokens equal before the first difference (summation order may differ between
    geometries, so random-weight models can part late), and the first step's top-8 logits."""
    def prefix(a: list, b: list) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    def top8(key: str) -> str:
        if key not in ref or key not in r:
            return "-"
        same = [i for i, _ in ref[key]] == [i for i, _ in r[key]]
        err = max(abs(a - b) for (_, a), (_, b) in zip(ref[key], r[key]))
        return f"{'same' if same else 'DIFFER'} max|d| {err:.2e}"

    return (f"agree {prefix(ref['tokens'], r['tokens'])}/{len(ref['tokens'])}+"
            f"{prefix(ref['tokens_long'], r['tokens_long'])}/{len(ref['tokens_long'])} "
            f"top8 {top8('top8')} pp top8 {top8('pp_top8')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("-o", "--out", type=Path, required=True)
    b.add_argument("--only", help="comma-separated geometry variant names (default: all, or none "
                   "when --rev is given)")
    b.add_argument("--rev", action="append", default=[], help="also a variant of the kernels as this "
                   "git commit built them (rev-REV; repeatable)")
    r = sub.add_parser("run")
    r.add_argument("-d", "--dir", type=Path, help="variants built by `build` (default: none, only "
                   "the environment variants)")
    r.add_argument("--no-env", action="store_true", help="leave the environment variants out")
    r.add_argument("-o", "--out", type=Path, required=True)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--timeout", type=float, default=90)
    r.add_argument("--n-gen", type=int, default=128)
    r.add_argument("--models", nargs="+", default=list(MODELS))
    m = sub.add_parser("measure")
    m.add_argument("--json", type=Path, required=True)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--n-gen", type=int, default=128)
    m.add_argument("--models", nargs="+", default=list(MODELS))
    args = ap.parse_args(argv)
    return {"build": cmd_build, "run": cmd_run, "measure": cmd_measure}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
