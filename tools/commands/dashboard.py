"""`ukgpu dashboard RESULTS... -o report.html`: one self-contained HTML report from bench results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboard", help="render bench results files into one self-contained HTML report",
        description="Charts tokens/s per backend and peer, the ratio to llama.cpp, kernels against the "
        "roofline and trends across files (ordered by their timestamps). The page needs no network.")
    parser.add_argument("results", nargs="+", type=Path, help="JSON files written by `ukgpu bench -o`")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="default report.html")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="also write the speed/TTFT/memory numbers as a Markdown table")
    parser.set_defaults(func=_dashboard)


def _dashboard(args: argparse.Namespace) -> int:
    from ukgpu.tools.bench.html import render
    from ukgpu.tools.bench.schema import load_report

    reports = [load_report(p) for p in args.results]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(reports, [p.name for p in args.results]))
    print(f"ukgpu dashboard: wrote {args.output} ({len(reports)} results files)", file=sys.stderr)
    if args.markdown:
        from ukgpu.tools.bench.summary import markdown_table

        args.markdown.write_text(markdown_table(reports))
        print(f"ukgpu dashboard: wrote {args.markdown}", file=sys.stderr)
    return 0
