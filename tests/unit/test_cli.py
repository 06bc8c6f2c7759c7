"""The `ukgpu` command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ukgpu.llama_core.models import registry

UKGPU = [sys.executable, "-m", "ukgpu.tools.cli"]


def ukgpu(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*UKGPU, *args], capture_output=True, text=True, timeout=120, env=env)


def test_help_lists_commands():
    out = ukgpu("--help")
    assert out.returncode == 0
    assert "models" in out.stdout
    import ukgpu.tools.commands as commands

    modules = sorted(p for p in Path(commands.__path__[0]).glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 14
    for module in modules:
        assert module.stem in out.stdout


def test_models_list_shows_cache_state(tmp_path, smollm2_path):
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    os.symlink(smollm2_path, cache / "models" / "smollm2-135m.gguf")
    out = ukgpu("models", "list", env={**os.environ, "UKGPU_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert set(lines) == set(registry.KNOWN_MODELS)
    name, arch, quant, _size, _unit, cached, path = lines["smollm2-135m"]
    assert (arch, quant, cached, path) == ("llama", "Q4_1", "yes", str(cache / "models" / "smollm2-135m.gguf"))
    assert lines["qwen2.5-coder-1.5b"][5] == "no"


def test_unknown_model_is_one_line_error():
    out = ukgpu("models", "pull", "no-such-model")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ukgpu: error: unknown model 'no-such-model'")
    assert "smollm2-135m" in lines[0]
    assert "Traceback" not in out.stderr
