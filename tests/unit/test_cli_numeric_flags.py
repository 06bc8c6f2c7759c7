"""Numeric flags out of range are refused while parsing, as one error line, never a traceback."""

from __future__ import annotations

import pytest

from ukgpu.tools.cli import build_parser, main


@pytest.mark.parametrize("argv, flag", [
    (["serve", "-m", "smollm2-135m", "--port", "70000"], "--port"),
    (["serve", "-m", "smollm2-135m", "--slots", "0"], "--slots"),
    (["serve", "-m", "smollm2-135m", "--max-queue", "0"], "--max-queue"),
    (["serve", "-m", "smollm2-135m", "--ctx", "1"], "--ctx"),
    (["serve", "-m", "smollm2-135m", "--max-body", "-1"], "--max-body"),
    (["serve", "-m", "smollm2-135m", "--header-timeout", "0"], "--header-timeout"),
    (["serve", "-m", "smollm2-135m", "--body-timeout", "nan"], "--body-timeout"),
    (["serve", "-m", "smollm2-135m", "--max-connections", "x"], "--max-connections"),
    (["generate", "-m", "smollm2-135m", "-p", "hi", "-c", "100000000"], "-c/--ctx"),
    (["generate", "-m", "smollm2-135m", "-p", "hi", "-n", "0"], "-n/--n-predict"),
    (["generate", "-m", "smollm2-135m", "-p", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "-m", "smollm2-135m", "-p", "hi", "--temp", "-1"], "--temp"),
    (["generate", "-m", "smollm2-135m", "-p", "hi", "-t", "0"], "-t/--threads"),
    (["chat", "-m", "smollm2-135m", "-n", "-3"], "-n/--n-predict"),
    (["bench", "-m", "smollm2-135m", "-r", "0"], "-r/--repeats"),
])
def test_out_of_range_numbers_are_one_usage_error(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: argument {flag}: " in err and ("out of range" in err or "not " in err), err


def test_in_range_numbers_parse_to_their_values():
    args = build_parser().parse_args(["serve", "-m", "smollm2-135m", "--port", "0", "--slots", "2",
                                      "--header-timeout", "2.5", "--max-prompt-chars", "1000"])
    assert (args.port, args.slots, args.header_timeout, args.max_prompt_chars) == (0, 2, 2.5, 1000)
    args = build_parser().parse_args(["generate", "-m", "smollm2-135m", "-p", "hi", "-c", "4096",
                                      "--repeat-last-n", "-1", "--top-p", "1"])
    assert (args.ctx, args.repeat_last_n, args.top_p) == (4096, -1, 1.0)
