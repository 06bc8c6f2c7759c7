"""`ukgpu serve` argument handling (no server is started)."""

from __future__ import annotations

from ukgpu.tools.cli import build_parser, main
from ukgpu.tools.commands.serve import model_id


def test_defaults_listen_on_loopback():
    args = build_parser().parse_args(["serve", "-m", "smollm2-135m"])
    assert (args.host, args.port, args.backend) == ("127.0.0.1", 8080, "auto")
    assert args.slots >= 1 and args.ctx >= 2


def test_unknown_model_is_a_one_line_error(capsys, tmp_path):
    assert main(["serve", "-m", str(tmp_path / "missing.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ukgpu: error:") and err.count("\n") == 1


def test_model_id_is_the_name_or_the_file_stem():
    assert model_id("smollm2-135m") == "smollm2-135m"
    assert model_id("/models/My-Model.Q4_0.gguf") == "My-Model.Q4_0"
