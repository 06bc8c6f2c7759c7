"""The GPU and kernel commands run on a machine without the web stack (a GPU host's own Python
has numpy and the CUDA bindings, not starlette): building the parser must not import it."""

import subprocess
import sys

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('starlette', 'uvicorn', 'httptools'):
            raise ModuleNotFoundError(f'No module named {name!r} (blocked)')
sys.meta_path.insert(0, Block())
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_the_parser_builds_without_starlette():
    r = run("from ukgpu.tools.cli import build_parser\n"
            "p = build_parser()\n"
            "a = p.parse_args(['serve', '-m', 'x.gguf', '--max-connections', '7'])\n"
            "print(a.max_connections, 'starlette' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["7", "False"]


def test_the_api_package_still_names_its_entry_points():
    r = run("import ukgpu.kernel.api as api\n"
            "print(api.ApiLimits.__name__)\n"
            "api.create_app")
    assert "ApiLimits" in r.stdout
    assert r.returncode != 0 and "blocked" in r.stderr  # create_app needs the web stack, said plainly
