"""Chat templates: the real SmolLM2 and Qwen2.5 templates (expected text written
out by hand from reading them), the ChatML fallback, and template errors."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from ukgpu.llama_core.errors import TokenizerError
from ukgpu.llama_core.gguf.file import open_gguf
from ukgpu.llama_core.text.chat import ChatTemplateError, render_chat
from ukgpu.llama_core.text.tokenizer import Tokenizer

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm_gguf(smollm2_path):
    return open_gguf(smollm2_path)


@pytest.fixture(scope="module")
def qwen_gguf(qwen05_path):
    return open_gguf(qwen05_path)


def test_smollm2_adds_its_default_system_prompt(smollm_gguf):
    text = render_chat(smollm_gguf, [{"role": "user", "content": "Hi"}])
    assert text == (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_keeps_a_given_system_prompt_and_history(smollm_gguf):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "and 3+3"}, {"type": "text", "text": "?"}]},
    ]
    text = render_chat(smollm_gguf, messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nand 3+3?<|im_end|>\n"
    )


def test_qwen25_default_system_and_conversation(qwen_gguf):
    messages = [{"role": "user", "content": "Write hello"}, {"role": "assistant", "content": "print('hello')"},
                {"role": "user", "content": "In C"}]
    assert render_chat(qwen_gguf, messages) == (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWrite hello<|im_end|>\n"
        "<|im_start|>assistant\nprint('hello')<|im_end|>\n"
        "<|im_start|>user\nIn C<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen25_tools_tool_calls_and_responses(qwen_gguf):
    tool = {"type": "function", "function": {"name": "weather", "description": "Wetter für <city>",
                                              "parameters": {"type": "object"}}}
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "12°C"},
        {"role": "tool", "content": "sunny"},
    ]
    text = render_chat(qwen_gguf, messages, tools=[tool])
    assert text == (
        "<|im_start|>system\nUse tools.\n\n# Tools\n\nYou may call one or more functions to assist with"
        " the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
        "<tools>\n" + json.dumps(tool, ensure_ascii=False) + "\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within"
        " <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\":"
        " <args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Zürich\"}}\n"
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n12°C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_rendered_prompt_tokenizes_markers_as_special_tokens(qwen_gguf):
    tok = Tokenizer.from_gguf(qwen_gguf)
    ids = tok.encode(render_chat(qwen_gguf, [{"role": "user", "content": "Hi"}]), parse_special=True)
    assert ids.count(tok.token_to_id["<|im_start|>"]) == 3
    assert ids.count(tok.token_to_id["<|im_end|>"]) == 2


def test_model_without_template_gets_chatml():
    md = {"tokenizer.ggml.tokens": ["<s>", "</s>"], "tokenizer.ggml.bos_token_id": 0}
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(md, messages) == expected
    assert render_chat(None, messages) == expected
    assert render_chat(md, messages, add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]


def test_bos_and_eos_come_from_the_metadata():
    md = {"tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
          "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    assert render_chat(md, [{"role": "user", "content": "x"}]) == "<s>x</s>"
    assert render_chat(md, [{"role": "user", "content": "x"}], bos_token="[B]") == "[B]x</s>"


def test_hf_environment_features():
    template = (
        "{% for m in messages %}\n"
        "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "    {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "{% generation %}[{{ m.content }}]{% endgeneration %}\n"
        "{% endfor %}\n"
        "{{ strftime_now('%Y') }} {{ {'k': 'é<'} | tojson }}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "skip", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_chat(template, messages) == f"[a]{datetime.now().year} {{\"k\": \"é<\"}}"


def test_broken_template_says_where():
    with pytest.raises(TokenizerError, match=r"does not compile \(line 2"):
        render_chat("{% for m in messages %}\n{{ m.content }\n{% endfor %}", [{"role": "user", "content": "x"}])


def test_raise_exception_reaches_the_caller():
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    assert render_chat(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="Conversation must start with user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{% set xs = [] %}{{ xs.append(1) }}",
])
def test_sandbox_blocks_unsafe_or_mutating_templates(template):
    with pytest.raises(ChatTemplateError, match="unsafe operation"):
        render_chat(template, [{"role": "user", "content": "x"}])


def test_bad_messages_are_rejected_clearly():
    with pytest.raises(ChatTemplateError, match="needs a 'role'"):
        render_chat(None, [{"content": "no role"}])
    with pytest.raises(ChatTemplateError, match="only text content"):
        render_chat(None, [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        render_chat(None, [{"role": "user", "content": None}])


def test_protection_finds_what_one_alternation_of_all_texts_finds():
    """The prefix-grouped finder wraps exactly what a single longest-first regex would."""
    import random
    import re

    from ukgpu.llama_core.text.chat import _TextFinder
    from ukgpu.llama_core.text.tokenizer import LITERAL_CLOSE, LITERAL_OPEN

    texts = frozenset(["<end_of_turn>", "<end>", "<e", "<unused1>", "<unused12>", "<unused123>", "[INST]",
                       "<|im_end|>", "<|im_end|>x", "ab", "abcdefghij", "abcdefghik"])
    whole = re.compile("|".join(re.escape(t) for t in sorted(texts, key=lambda t: (-len(t), t))))
    finder = _TextFinder(texts)
    rng = random.Random(5)
    alphabet = ["a", "b", "c", "<", ">", "e", "x", " ", "1", "2"] + sorted(texts)
    wrapped = 0
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
        expected = whole.sub(lambda m: LITERAL_OPEN + m[0] + LITERAL_CLOSE, s)
        assert finder.wrap(s) == expected, s
        wrapped += expected != s
    assert wrapped > 500
