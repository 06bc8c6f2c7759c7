"""Chat templates: a conversation -> the prompt text the model was trained on.

A GGUF model carries its Jinja chat template in `tokenizer.chat_template`.
It is rendered the way Hugging Face transformers renders it (sandboxed and
immutable, `trim_blocks` + `lstrip_blocks`, `{% break %}`/`{% continue %}`,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text and
`<>&` as they are, `{% generation %}` blocks rendered as plain text).  A model
without a template gets ChatML (`<|im_start|>role\\n...<|im_end|>\\n`).

    prompt = render_chat(gguf_file, [{"role": "user", "content": "Hi"}])
    ids = tokenizer.encode(prompt, add_special=..., parse_special=True)

Encode the prompt with `parse_special=True` so that the template's markers
become their special tokens.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ukgpu.llama_core.errors import TokenizerError

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class ChatTemplateError(TokenizerError):
    """A chat template cannot be compiled or rendered for the given messages."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training): render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached), or ChatTemplateError saying where it is broken."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not compile (line {exc.lineno}: {exc.message}):"
            " fix tokenizer.chat_template or pass a template of your own"
        ) from None


def render_chat(
    template_or_metadata: Any,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **context: Any,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) into the prompt text.

    template_or_metadata: a template string, a GGUF metadata dict, an opened
    GGUF file (anything with `.metadata`), or None for ChatML.  bos_token /
    eos_token default to the model's own token texts when metadata is given.
    Extra keyword arguments (e.g. `tools=[...]`) are passed to the template.
    """
    source, md_bos, md_eos = _template_source(template_or_metadata)
    template = compile_template(source)
    variables = dict(context)
    variables.update(
        messages=[_normalize(m, i) for i, m in enumerate(messages)],
        add_generation_prompt=add_generation_prompt,
        bos_token=md_bos if bos_token is None else bos_token,
        eos_token=md_eos if eos_token is None else eos_token,
    )
    try:
        return template.render(**variables)
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"the chat template tried an unsafe operation ({exc}): use a trusted template") from None
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(
            f"the chat template refused these messages: {exc}; check the roles and their order"
        ) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ChatTemplateError(
            f"the chat template failed on these messages ({type(exc).__name__}: {exc}):"
            " check that every message has the fields the template reads"
        ) from None


def _template_source(template_or_metadata: Any) -> tuple[str, str, str]:
    """(template text, bos text, eos text) from whatever the caller has."""
    if template_or_metadata is None or isinstance(template_or_metadata, str):
        return template_or_metadata or CHATML_TEMPLATE, "", ""
    md = getattr(template_or_metadata, "metadata", template_or_metadata)
    if not isinstance(md, Mapping):
        raise ChatTemplateError(
            f"render_chat() takes a template string, GGUF metadata or a GGUF file, not"
            f" {type(template_or_metadata).__name__}"
        )
    source = md.get("tokenizer.chat_template") or CHATML_TEMPLATE
    return source, _token_text(md, "bos"), _token_text(md, "eos")


def _token_text(md: Mapping[str, Any], role: str) -> str:
    tokens = md.get("tokenizer.ggml.tokens") or []
    token_id = md.get(f"tokenizer.ggml.{role}_token_id")
    if isinstance(token_id, int) and 0 <= token_id < len(tokens):
        return tokens[token_id]
    return ""


def _normalize(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A plain dict; OpenAI-style content parts [{"type": "text", "text": ...}] joined into one string."""
    if not isinstance(message, Mapping) or "role" not in message:
        raise ChatTemplateError(f"message {index} needs a 'role' (and usually 'content'): got {message!r:.80}")
    out = dict(message)
    content = out.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(f"message {index}: only text content is supported, not {kind!r}")
            texts.append(str(part.get("text", "")))
        out["content"] = "".join(texts)
    return out
