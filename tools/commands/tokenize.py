"""`ukgpu tokenize`: a model's token ids and pieces for some text, or the text of ids."""

from __future__ import annotations

import argparse
import sys

from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.models.registry import resolve_model
from ukgpu.llama_core.text.tokenizer import Tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenize", help="show the token ids and pieces of a text, or decode ids",
        description="Tokenize TEXT (or standard input) with a model's vocabulary and print one"
                    " 'id  piece' line per token; with --decode, print the text of the given ids.",
    )
    parser.add_argument("text", nargs="?", metavar="TEXT", help="text to tokenize (default: standard input)")
    parser.add_argument("-m", "--model", default="smollm2-135m",
                        help="known model name or .gguf path (default: %(default)s)")
    parser.add_argument("--ids", action="store_true", help="print only the ids, on one line")
    parser.add_argument("--no-special", action="store_true",
                        help="add no BOS/EOS and read special-token texts such as <|im_end|> as plain text")
    parser.add_argument("--decode", nargs="+", type=int, metavar="ID", help="print the text of these token ids")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    tok = Tokenizer.from_gguf(open_gguf(resolve_model(args.model)))
    if args.decode:
        print(tok.decode(args.decode, special=not args.no_special))
        return 0
    text = args.text if args.text is not None else sys.stdin.read()
    special = not args.no_special
    ids = tok.encode(text, add_special=special, parse_special=special)
    if args.ids:
        print(" ".join(map(str, ids)))
        return 0
    width = len(str(tok.vocab_size - 1))
    for token in ids:
        print(f"{token:>{width}}  {_show(tok.token_bytes(token))}")
    print(f"{len(ids)} tokens ({tok.kind}, pre-tokenizer {tok.pre})", file=sys.stderr)
    return 0


def _show(piece: bytes) -> str:
    """A piece as a quoted string, or as bytes when it is only part of a UTF-8 character."""
    try:
        return repr(piece.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(piece)
