"""Constrained decoding: a grammar that masks the logits so only tokens it accepts are sampled.

The engine is llguidance (MIT, a Rust extension with no Python dependencies; the parser
llama.cpp and vLLM use).  It works on the token level from a list of token byte strings,
which is what our GGUF tokenizer gives (`Tokenizer.token_bytes`); control tokens are
passed with a leading 0xff byte, llguidance's marker for special tokens, so the grammar
never lets the model write `<|im_end|>` as text.  The end-of-generation ids are its EOS:
once the grammar is complete only they remain, the sampler picks one, and the engine
finishes the sequence with "stop".

    spec = GrammarSpec.json_schema(tokenizer, {"type": "object", ...})   # any thread
    matcher = spec.matcher()            # one per sequence (the Sampler makes it)
    logits = matcher.mask(logits)       # disallowed tokens -> -inf
    matcher.accept(token)               # after sampling

JSON is compiled compact (no free whitespace between tokens): a small model otherwise
tends to fill its budget with newlines, which the grammar would allow forever.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np

from ukgpu.llama_core.errors import UkgpuError

_ANY_OBJECT = {"type": "object"}
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> LLTokenizer
_tokenizers_lock = threading.Lock()


class GrammarError(UkgpuError):
    """A grammar or schema the engine cannot compile, or a token the grammar refused."""


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of our tokenizer (built once per tokenizer: about a second for 150k
    tokens, most of it the token-byte table)."""
    with _tokenizers_lock:
        cached = _tokenizers.get(tokenizer)
        if cached is None:
            cached = _tokenizers[tokenizer] = _build_ll_tokenizer(tokenizer)
        return cached


def _build_ll_tokenizer(tokenizer: Any) -> Any:
    import llguidance

    n = tokenizer.vocab_size
    tokens = [(b"\xff" + tokenizer.token_bytes(i)) if tokenizer.is_control(i)
              else tokenizer.token_bytes(i) for i in range(n)]
    eog = sorted(tokenizer.eog_ids)
    if not eog:
        raise GrammarError("the model's tokenizer names no end-of-generation token: a grammar "
                           "could never finish; use a model whose GGUF sets tokenizer.ggml.eos_token_id")

    class _Vocab:
        eos_token_id = eog[0]
        bos_token_id = tokenizer.bos_id
        special_token_ids = [i for i in range(n) if tokenizer.is_control(i)]

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, data: bytes) -> list[int]:
            return list(tokenizer.encode(data.decode("utf-8", errors="replace"), add_special=False))

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()), n_vocab=n, eos_token=eog)


class GrammarSpec:
    """A compiled grammar for one tokenizer; immutable, shared by the sequences that use it."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        import llguidance

        self.ll_tokenizer = ll_tokenizer(tokenizer)
        self.grammar = grammar
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if failed:
            raise GrammarError(f"the grammar does not compile: {'; '.join(messages)}")

    @classmethod
    def json_schema(cls, tokenizer: Any, schema: dict | None = None) -> GrammarSpec:
        """JSON that validates against `schema` (None: any JSON object).  Schema features the
        compiler does not implement are a GrammarError naming them (never silently ignored)."""
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema if schema is not None else _ANY_OBJECT),
                overrides={"whitespace_flexible": False})  # compact JSON: see the module docstring
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the JSON schema is not usable: {exc}") from None
        return cls(tokenizer, grammar)

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self)


class GrammarMatcher:
    """The grammar's state within one sequence: which tokens may come next."""

    def __init__(self, spec: GrammarSpec) -> None:
        import llguidance

        self._m = llguidance.LLMatcher(spec.ll_tokenizer, spec.grammar, log_level=0)
        self._n = spec.ll_tokenizer.vocab_size
        self._allowed: np.ndarray | None = None  # bool[vocab] at the current position
        self._check()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits float[vocab] with every token the grammar refuses at -inf (the
        allowed set is computed once per position: asking again before `accept` is cheap)."""
        if self._allowed is None:
            bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
            self._check()
            self._allowed = np.unpackbits(bits, bitorder="little")[:self._n].astype(bool)
        n = min(self._n, logits.shape[0])
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        out[:n] = np.where(self._allowed[:n], logits[:n], -np.inf)
        return out

    def accept(self, token: int) -> None:
        """Advance past a sampled token (one the mask allowed)."""
        self._allowed = None
        self._m.consume_token(int(token))
        self._check()

    @property
    def done(self) -> bool:
        """Whether the grammar has finished (only end-of-generation remains)."""
        return bool(self._m.is_stopped())

    def _check(self) -> None:
        if self._m.is_error():
            raise GrammarError(f"grammar state: {self._m.get_error()}")
