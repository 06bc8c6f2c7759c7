"""Chat templates: a conversation -> the prompt text (and ids) the model was trained on.

A GGUF model carries its Jinja chat template in `tokenizer.chat_template`.
It is rendered the way Hugging Face transformers renders it (sandboxed and
immutable, `trim_blocks` + `lstrip_blocks`, `{% break %}`/`{% continue %}`,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text and
`<>&` as they are, `{% generation %}` blocks rendered as plain text), under the
time, size and recursion limits of `template_sandbox` (the template is input from
the model file).  A model without a template gets its family's (Gemma's) or ChatML
(`chat_templates.default_template`).

    ids = chat_ids(tokenizer, gguf_file, [{"role": "user", "content": "Hi"}])
    prompt = render_chat(gguf_file, [{"role": "user", "content": "Hi"}])  # the text, to show

Templates that write `bos_token` themselves (Gemma, Llama 3, Mistral) meet a tokenizer that
adds BOS too: `chat_ids` drops the rendered text's leading BOS text when the tokenizer adds
one (and a trailing EOS text when it adds EOS), as llama.cpp does, so the prompt starts with
exactly one BOS.

The template's own markers must become special tokens, but text that users wrote must
not: a message saying "<|im_end|><|im_start|>system" would otherwise forge a system
turn.  `chat_ids` therefore wraps every special-token text inside the messages (and the
other variables, e.g. tools) in the tokenizer's literal markers before rendering, and
encodes with `Tokenizer.encode_marked`, which parses special tokens only outside them.
Never encode `render_chat`'s text of untrusted messages with `parse_special=True`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext

from ukgpu.llama_core.text.chat_templates import CHATML_TEMPLATE, default_template
from ukgpu.llama_core.text.template_sandbox import (
    GUARD_FILTERS,
    ChatTemplateError,
    GuardedEnvironment,
    GuardedTemplate,
    guard_ast,
    guard_filter,
    tojson,
)
from ukgpu.llama_core.text.tokenizer import LITERAL_CLOSE, LITERAL_OPEN

__all__ = ["CHATML_TEMPLATE", "ChatTemplateError", "chat_ids", "compile_template", "render_chat"]

MAX_TEMPLATE_CHARS = 1 << 20  # real templates are a few KB; compiling costs ~1 ms per KB


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


@functools.lru_cache(maxsize=1)
def _environment() -> GuardedEnvironment:
    env = GuardedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.template_class = GuardedTemplate
    env.filters["tojson"] = tojson
    env.filters = {name: guard_filter(name, f) for name, f in env.filters.items()} | GUARD_FILTERS
    env.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached), or ChatTemplateError saying where it is broken."""
    if not isinstance(source, str):
        raise ChatTemplateError(f"the chat template is {type(source).__name__}, not text:"
                                " fix tokenizer.chat_template or pass a template of your own")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"the chat template has {len(source)} characters (at most {MAX_TEMPLATE_CHARS}):"
                                " fix tokenizer.chat_template or pass a template of your own")
    return _compile(source)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = _environment()
    try:
        return env.from_string(guard_ast(env.parse(source)))
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not compile (line {exc.lineno}: {exc.message}):"
            " fix tokenizer.chat_template or pass a template of your own"
        ) from None
    except (RecursionError, MemoryError, SyntaxError, ValueError) as exc:  # nesting too deep for Python
        raise ChatTemplateError(
            f"the chat template does not compile ({type(exc).__name__}: {str(exc):.200}):"
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
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"the chat template tried an unsafe operation ({exc}): "
                                "use a trusted template") from None
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(
            f"the chat template refused these messages: {exc}; check the roles and their order"
        ) from None
    except RecursionError:
        raise ChatTemplateError("the chat template recursed too deeply: fix tokenizer.chat_template") from None
    except Exception as exc:  # the template is input: whatever it does wrong is reported, not raised
        raise ChatTemplateError(
            f"the chat template failed on these messages ({type(exc).__name__}: {str(exc):.200}):"
            " check that every message has the fields the template reads"
        ) from None


def chat_ids(tokenizer: Any, template_or_metadata: Any, messages: Sequence[Mapping[str, Any]],
             add_generation_prompt: bool = True, **context: Any) -> list[int]:
    """Token ids of the chat prompt (BOS added where the model asks): the template's special
    tokens are control tokens, special-token texts inside messages and `context` stay text.

    The texts protected are those of the tokenizer's control tokens (`Tokenizer.control_texts`),
    whatever the template comes from (a template of your own with the model's metadata:
    `{**md, "tokenizer.chat_template": ...}`).
    """
    protect = functools.partial(_protected, finder=_finder(tokenizer.control_texts))
    text = render_chat(template_or_metadata, protect(list(messages)), add_generation_prompt,
                       **{key: protect(value) for key, value in context.items()})
    return tokenizer.encode_marked(_without_added_specials(tokenizer, text), add_special=True)


def _without_added_specials(tokenizer: Any, text: str) -> str:
    """`text` less a leading BOS text and a trailing EOS text where the tokenizer adds those
    tokens itself (texts inside messages are between literal markers, so never at the ends)."""
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        text = text.removeprefix(tokenizer.token_text(tokenizer.bos_id))
    if tokenizer.add_eos and tokenizer.eos_id is not None:
        text = text.removesuffix(tokenizer.token_text(tokenizer.eos_id))
    return text


class _TextFinder:
    """Finds the texts of a (large) set in strings: Gemma 3 has 6,400 control tokens, and one
    regular expression of them all costs ~10 us per "<" in a message.  The texts are grouped by
    their first PREFIX characters; a string is scanned once per group (about a hundred) and
    only the texts it holds join the expression, longest first (the longest text at a
    position wins)."""

    PREFIX = 8

    def __init__(self, texts: frozenset[str]):
        self._groups: dict[str, list[str]] = {}
        for text in sorted(t for t in texts if t):
            self._groups.setdefault(text[:self.PREFIX], []).append(text)

    def wrap(self, value: str) -> str:
        """`value` with every occurrence of a text between literal markers."""
        present = [t for prefix, group in self._groups.items() if prefix in value for t in group if t in value]
        if not present:
            return value
        return _pattern(frozenset(present)).sub(lambda m: LITERAL_OPEN + m[0] + LITERAL_CLOSE, value)


@functools.lru_cache(maxsize=8)
def _finder(texts: frozenset[str]) -> _TextFinder:
    return _TextFinder(texts)


@functools.lru_cache(maxsize=256)
def _pattern(texts: frozenset[str]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=lambda t: (-len(t), t))))


def _protected(value: Any, finder: _TextFinder) -> Any:
    """`value` with every control-token text in its strings (keys included) between literal
    markers; markers the user typed are replaced, so they cannot open or close a region."""
    if isinstance(value, str):
        if LITERAL_OPEN in value or LITERAL_CLOSE in value:
            value = value.replace(LITERAL_OPEN, "\ufffd").replace(LITERAL_CLOSE, "\ufffd")
        return finder.wrap(value)
    if isinstance(value, Mapping):
        return {_protected(k, finder): _protected(v, finder) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_protected(v, finder) for v in value]
    return value


def _metadata(template_or_metadata: Any) -> Mapping[str, Any] | None:
    if template_or_metadata is None or isinstance(template_or_metadata, str):
        return None
    md = getattr(template_or_metadata, "metadata", template_or_metadata)
    if not isinstance(md, Mapping):
        raise ChatTemplateError(
            f"render_chat() takes a template string, GGUF metadata or a GGUF file, not"
            f" {type(template_or_metadata).__name__}"
        )
    return md


def _template_source(template_or_metadata: Any) -> tuple[Any, str, str]:
    """(template, bos text, eos text) from whatever the caller has; compile_template checks the template."""
    md = _metadata(template_or_metadata)
    if md is None:
        return template_or_metadata or CHATML_TEMPLATE, "", ""
    source = md.get("tokenizer.chat_template")
    if source is None or source == "":
        source = default_template(md)
    return source, _token_text(md, "bos"), _token_text(md, "eos")


def _token_text(md: Mapping[str, Any], role: str) -> str:
    tokens = md.get("tokenizer.ggml.tokens")
    token_id = md.get(f"tokenizer.ggml.{role}_token_id")
    if isinstance(tokens, Sequence) and isinstance(token_id, int) and 0 <= token_id < len(tokens):
        text = tokens[token_id]
        return text if isinstance(text, str) else ""
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
