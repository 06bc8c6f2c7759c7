"""`ukgpu generate` and `ukgpu chat` end to end on SmolLM2 (greedy, a few tokens)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from ukgpu.llama_core.text.tokenizer import Tokenizer
from ukgpu.tools.cli import main

GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "smollm2-135m.npz"
STATS = re.compile(r"prompt: (\d+) tokens, [\d.]+ s, [\d.]+ t/s \| decode: (\d+) tokens, "
                   r"[\d.]+ s, [\d.]+ t/s \| finish: (\w+)")


@pytest.fixture(scope="module")
def golden_text(smollm2) -> tuple[str, str]:
    """(prompt text, its 8-token greedy continuation) from llama.cpp's golden data."""
    tok = Tokenizer.from_gguf(smollm2)
    with np.load(GOLDEN) as data:
        prompt, greedy = data["prompt_ids"].tolist(), data["greedy_ids"][:8].tolist()
    text = tok.decode(prompt)
    assert tok.encode(text, add_special=True) == prompt  # the prompt round-trips
    return text, tok.decode(greedy)


def test_generate_streams_llamacpps_greedy_tokens(smollm2_path, golden_text, capsys):
    prompt, expected = golden_text
    rc = main(["generate", "-m", str(smollm2_path), "-p", prompt, "-n", "8", "--temp", "0",
               "--backend", "cpu", "-c", "128"])
    out, err = capsys.readouterr()
    assert rc == 0 and out == expected + "\n"
    stats = STATS.search(err)
    assert stats and stats.groups() == ("64", "8", "length")


def test_generate_stop_string(smollm2_path, golden_text, capsys):
    prompt, expected = golden_text
    stop = expected.strip().split()[1]
    main(["generate", "-m", str(smollm2_path), "-p", prompt, "-n", "8", "--temp", "0",
          "--backend", "cpu", "-c", "128", "--stop", stop])
    out, err = capsys.readouterr()
    assert out == expected[: expected.find(stop)] + "\n"
    assert STATS.search(err).group(3) == "stop"


def test_generate_too_long_is_one_clear_error(smollm2_path, capsys):
    rc = main(["generate", "-m", str(smollm2_path), "-p", "hello", "-n", "64", "-c", "16",
               "--backend", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "larger n_ctx" in err[0]


def test_chat_answers_then_exits(smollm2_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\n/exit\nnever read\n"))
    rc = main(["chat", "-m", str(smollm2_path), "--temp", "0", "-n", "6", "-c", "256",
               "--backend", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert len(STATS.findall(err)) == 1  # one turn, then /exit
    reply = out.split("> ")[1].strip()
    assert reply  # the model said something


def test_chat_second_turn_prefills_only_the_new_message(smollm2_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\nAnd 3+3?\n"))
    rc = main(["chat", "-m", str(smollm2_path), "--temp", "0", "-n", "6", "-c", "256",
               "--backend", "cpu"])
    _, err = capsys.readouterr()
    turns = [(int(prompt), int(cached)) for prompt, cached in
             re.findall(r"prompt: (\d+) tokens, .* \| cached: (\d+) tokens", err)]
    assert rc == 0 and len(turns) == 2
    (prompt1, cached1), (prompt2, cached2) = turns
    assert cached1 == 0
    # turn 1's prompt and reply (less its last token, never fed back) come from the cache;
    # what is evaluated is the new message and the template's markers around it
    assert prompt1 < cached2 < prompt2
