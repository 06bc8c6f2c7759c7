"""Write llama.cpp's renderings of the model families' chat templates for the chat tests.

Runs under a Python that has `llama-cpp-python` (for instance
`/root/ref/venv/bin/python tools/dev/golden_chat.py`); it uses nothing from ukgpu.
For each template in tests/data/templates (the text each family's GGUF files carry
in `tokenizer.chat_template`), llama.cpp's `llama_chat_apply_template` recognises
the family from the template text and renders a few conversations with its own
built-in formatter.  The result, `tests/data/templates/llama_cpp.json`, is

    {family: {"template": file name, "cases": [{"messages", "add_ass", "text"}]}}

llama.cpp leaves the BOS token out of the text (the tokenizer adds it).
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "tests" / "data" / "templates"

ONE_TURN = [{"role": "user", "content": "Hi there"}]
HISTORY = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
           {"role": "user", "content": "Tell me a joke about\nnewlines."}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
# family -> template file and the conversations its template accepts (Mistral's has no system role)
FAMILIES = {
    "gemma3": ("gemma3.jinja", (ONE_TURN, HISTORY, WITH_SYSTEM)),
    "llama3": ("llama3.jinja", (ONE_TURN, HISTORY, WITH_SYSTEM)),
    "phi3": ("phi3.jinja", (ONE_TURN, HISTORY, WITH_SYSTEM)),
    "qwen3": ("qwen3.jinja", (ONE_TURN, HISTORY, WITH_SYSTEM)),
    "mistral": ("mistral.jinja", (ONE_TURN, HISTORY)),
}


def apply_template(template: str, messages: list[dict], add_ass: bool) -> str:
    import llama_cpp

    array = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    size = 4096
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(template.encode(), array, len(messages), add_ass, buf, size)
    if n < 0 or n > size:
        raise SystemExit(f"llama.cpp does not know this template or the buffer is short (returned {n})")
    return buf.raw[:n].decode("utf-8")


def main() -> int:
    import llama_cpp

    out: dict = {"llama_cpp_python": llama_cpp.__version__}
    for family, (name, conversations) in FAMILIES.items():
        template = (TEMPLATE_DIR / name).read_text(encoding="utf-8")
        cases = [{"messages": messages, "add_ass": True, "text": apply_template(template, messages, True)}
                 for messages in conversations]
        out[family] = {"template": name, "cases": cases}
    path = TEMPLATE_DIR / "llama_cpp.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
