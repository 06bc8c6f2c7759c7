"""The tokenizer of a GGUF model, built from its `tokenizer.ggml.*` metadata.

Two vocabulary kinds are supported: SentencePiece-style (`llama`: Llama 1/2,
Mistral 7B, Phi-3, Gemma 3, ...) and byte-level BPE (`gpt2`: GPT-2, Llama 3,
Qwen 2/3, SmolLM, Mistral Nemo, Phi-4-mini, ...), with their token ids matching
llama.cpp's for the same file.

    tok = Tokenizer.from_gguf(open_gguf(path))
    ids = tok.encode("Hello", add_special=True)        # BOS prepended if the model asks
    text = tok.decode(ids)
    stream = IncrementalDecoder(tok)                   # text only once UTF-8 is complete
    pieces = [stream.push(i) for i in ids] + [stream.flush()]

Special tokens: control tokens (BOS, <|im_end|>, ...) are recognised in the
input text only with `parse_special=True`; user-defined tokens always are.
Decoding leaves control tokens out unless `special=True`.  A rendered chat prompt
mixes both kinds of text: `encode_marked` parses control tokens except between
LITERAL_OPEN and LITERAL_CLOSE, where `chat.chat_ids` puts the control-token
texts found in what users wrote (`control_texts`).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from ukgpu.llama_core.errors import TokenizerError
from ukgpu.llama_core.text import vocab_keys as keys
from ukgpu.llama_core.text.bpe import BpeModel, byte_alphabet_inverse
from ukgpu.llama_core.text.pretokenize import pre_config
from ukgpu.llama_core.text.special_split import (
    BYTE,
    CONTROL,
    NORMAL,
    RSTRIP,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    SpecialSplitter,
)
from ukgpu.llama_core.text.spm import SPACE, SpmModel

# `tokenizer.ggml.token_type` value -> attribute (0 = undefined, as is any other value)
_TYPE_ATTR = np.array([0, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE])
_BYTE_TOKEN = re.compile("<0x[0-9A-Fa-f]{2}>")

# Text between these two is plain text even where control tokens are parsed; both are
# Unicode noncharacters, reserved for a program's internal use.
LITERAL_OPEN, LITERAL_CLOSE = "\ufdd0", "\ufdd1"

# Tokens found by their text when the metadata does not name them; each one
# found this way is treated as a control token.
_ROLE_TEXTS: dict[str, tuple[str, ...]] = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
            "<|end_of_text|>", "<EOT>", "_<EOT>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
            "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>",
                "<PRE>", "\u2581<PRE>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>",
                "<SUF>", "\u2581<SUF>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>",
                "<MID>", "\u2581<MID>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# Tokens that end generation wherever they appear in a vocabulary.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
              "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
              "<\uff5cend\u2581of\u2581sentence\uff5c>")
# metadata key (after "tokenizer.ggml.") -> role
_ROLE_KEYS = {
    "bos_token_id": "bos", "eos_token_id": "eos", "eot_token_id": "eot", "eom_token_id": "eom",
    "unknown_token_id": "unk", "padding_token_id": "pad",
    "fim_pre_token_id": "fim_pre", "fim_suf_token_id": "fim_suf", "fim_mid_token_id": "fim_mid",
    "fim_pad_token_id": "fim_pad", "fim_rep_token_id": "fim_rep", "fim_sep_token_id": "fim_sep",
}
# default special ids per vocabulary kind (before the metadata is read)
_DEFAULT_ROLES = {"spm": {"bos": 1, "eos": 2, "unk": 0}, "bpe": {"bos": 11, "eos": 11}}


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary."""

    def __init__(self, md: dict[str, Any]):
        kind = keys.text(md, "tokenizer.ggml.model", "")
        if kind not in ("llama", "gpt2"):
            raise TokenizerError(
                f"unsupported tokenizer.ggml.model {kind!r:.40}: only 'llama' (SentencePiece) and"
                " 'gpt2' (byte-level BPE) vocabularies are supported; use such a model"
            )
        self.kind = "spm" if kind == "llama" else "bpe"
        self.tokens: list[str] = keys.tokens(md)
        self._attrs = _token_attrs(md, self.tokens)
        self.token_to_id = dict(zip(self.tokens, range(len(self.tokens))))  # a repeated text: its last id
        self._roles = self._read_roles(md)
        self._configure(md)
        self._find_roles_by_text()
        self.eog_ids = self._collect_eog()
        self._splitter = SpecialSplitter(self.tokens, self._attrs)
        self._special_order = self._splitter.order
        self._apply_name_quirks(md)
        # every text that encode(parse_special=True) turns into a control (or unknown) token
        self.control_texts = frozenset(self.tokens[i] for i in self._special_order
                                       if self._attrs[i] & (CONTROL | UNKNOWN))
        self._bytes_cache: dict[int, bytes] = {}

    # ---- construction -------------------------------------------------

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> Tokenizer:
        """Build from GGUF metadata as plain Python values (str, int, bool, lists)."""
        return cls(md)

    @classmethod
    def from_gguf(cls, gguf_file: Any) -> Tokenizer:
        """Build from an opened GGUF file (anything with a `.metadata` dict)."""
        return cls(gguf_file.metadata)

    def _read_roles(self, md: dict[str, Any]) -> dict[str, int]:
        n = len(self.tokens)
        roles = {r: i for r, i in _DEFAULT_ROLES[self.kind].items() if i < n}
        for key, role in _ROLE_KEYS.items():
            value = keys.token_id(md, f"tokenizer.ggml.{key}", n)
            if value is not None:
                roles[role] = value
        return roles

    def _configure(self, md: dict[str, Any]) -> None:
        if self.kind == "spm":
            self.pre = "default"
            add_bos, self.add_space_prefix, self.clean_spaces = True, True, False
            scores = keys.numbers(md, "tokenizer.ggml.scores", len(self.tokens), integers=False)
            score_list = [0.0] * len(self.tokens) if scores is None else scores.tolist()
            self._model: SpmModel | BpeModel = SpmModel(self.token_to_id, score_list)
        else:
            self.pre = keys.text(md, "tokenizer.ggml.pre", "") or "default"
            config = pre_config(self.pre)
            add_bos, self.add_space_prefix, self.clean_spaces = config.add_bos, False, config.clean_spaces
            merges = keys.merges(md)
            if not merges:
                raise TokenizerError(
                    "a 'gpt2' vocabulary without tokenizer.ggml.merges: re-convert the model"
                    " with its merges"
                )
            self._model = BpeModel(self.token_to_id, merges, self.pre)
        self.add_bos = keys.flag(md, "tokenizer.ggml.add_bos_token", add_bos)
        self.add_eos = keys.flag(md, "tokenizer.ggml.add_eos_token", False)
        self.add_space_prefix = keys.flag(md, "tokenizer.ggml.add_space_prefix", self.add_space_prefix)
        if self.add_bos and self.bos_id is None:
            raise TokenizerError("the vocabulary asks for a BOS token but has none: fix add_bos_token")

    def _find_roles_by_text(self) -> None:
        for role, texts in _ROLE_TEXTS.items():
            if role in self._roles:
                continue
            for text in texts:
                token = self.token_to_id.get(text)
                if token is not None:
                    self._roles[role] = token
                    self._attrs[token] |= CONTROL
                    break

    def _collect_eog(self) -> frozenset[int]:
        eog = {self._roles[r] for r in ("fim_pad", "fim_rep", "fim_sep", "eos", "eot", "eom") if r in self._roles}
        for text in _EOG_TEXTS:
            token = self.token_to_id.get(text)
            if token is not None:
                eog.add(token)
                self._attrs[token] |= CONTROL
        return frozenset(eog)

    def _apply_name_quirks(self, md: dict[str, Any]) -> None:
        """Phi-3's special tokens swallow the whitespace that follows them."""
        name = str(md.get("general.name", "")).lower()
        if "phi-3" not in name and "phi3" not in name:
            return
        for token in self._special_order:
            self._attrs[token] |= RSTRIP
        for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
            found = self.token_to_id.get(text)
            if found is not None:
                self._attrs[found] = (self._attrs[found] | RSTRIP) if on else (self._attrs[found] & ~RSTRIP)

    # ---- properties -----------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def bos_id(self) -> int | None:
        return self._roles.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self._roles.get("eos")

    @property
    def eot_id(self) -> int | None:
        return self._roles.get("eot")

    @property
    def pad_id(self) -> int | None:
        return self._roles.get("pad")

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[self._checked(token_id)] & (CONTROL | UNKNOWN))

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry as stored (byte-level BPE entries use stand-in characters)."""
        return self.tokens[self._checked(token_id)]

    # ---- encoding -------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`.

        add_special: add BOS/EOS where the model asks for them.
        parse_special: recognise control-token texts such as "<|im_start|>" in `text`.
        """
        return self._encode_fragments(self._partition(_valid(text), parse_special), add_special)

    def encode_marked(self, text: str, add_special: bool = True) -> list[int]:
        """`encode(text, add_special, parse_special=True)`, except that text between LITERAL_OPEN
        and LITERAL_CLOSE is plain text (as with parse_special=False); the markers are dropped.
        An unclosed region runs to the end; a stray LITERAL_CLOSE is dropped."""
        fragments: list[str | int] = []
        for i, chunk in enumerate(_valid(text).split(LITERAL_OPEN)):
            literal, _, parsed = chunk.partition(LITERAL_CLOSE) if i else ("", "", chunk)
            for piece, parse in ((literal, False), (parsed.replace(LITERAL_CLOSE, ""), True)):
                for fragment in self._partition(piece, parse):
                    if isinstance(fragment, str) and fragments and isinstance(fragments[-1], str):
                        fragments[-1] += fragment  # text on both sides of a marker is one text
                    else:
                        fragments.append(fragment)
        return self._encode_fragments(fragments, add_special)

    def _encode_fragments(self, fragments: list[str | int], add_special: bool) -> list[int]:
        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self._roles["bos"])
        after_special = True  # SentencePiece prefixes a space to text that starts or follows a special
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
            elif self.kind == "spm":
                prefix = " " if self.add_space_prefix and after_special else ""
                ids += self._model.encode((prefix + fragment).replace(" ", SPACE))
                after_special = False
            else:
                ids += self._model.encode(fragment)
        if add_special and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split `text` on special-token texts, longest first: text pieces and token ids."""
        return self._splitter.split(text, parse_special)

    # ---- decoding -------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token gives its own text)."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        attr = self._attrs[self._checked(token_id)]
        text = self.tokens[token_id]
        if attr & (CONTROL | UNKNOWN | USER_DEFINED):
            data = text.encode("utf-8")
        elif attr & NORMAL:
            data = self._normal_bytes(text)
        elif attr & BYTE:
            data = bytes([int(text[3:5], 16)])
        else:  # unused or undefined
            data = b""
        self._bytes_cache[token_id] = data
        return data

    def _normal_bytes(self, text: str) -> bytes:
        if self.kind == "spm":
            return text.replace(SPACE, " ").encode("utf-8")
        inverse = byte_alphabet_inverse()
        out = bytearray()
        for ch in text:
            byte = inverse.get(ch)
            if byte is None:
                out += ch.encode("utf-8")
            else:
                out.append(byte)
        return bytes(out)

    def piece_bytes(self, token_id: int, special: bool = False) -> bytes:
        """Bytes of one token in generated text: control tokens are empty unless `special`."""
        if not special and self._attrs[self._checked(token_id)] & (CONTROL | UNKNOWN):
            return b""
        return self.token_bytes(token_id)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """The text of a whole sequence (control tokens omitted unless `special`).

        A SentencePiece model's leading space, added by encode, is removed.
        """
        chunks = []
        strip_space = self.add_space_prefix
        for token in ids:
            data = self.piece_bytes(token, special)
            if not data:
                continue
            if strip_space and data[:1] == b" ":
                data = data[1:]
            strip_space = False
            chunks.append(data)
        data = b"".join(chunks)
        if self.clean_spaces:
            data = _clean_spaces(data)
        return data.decode("utf-8", errors="replace")

    def _checked(self, token_id: int) -> int:
        if not 0 <= token_id < len(self.tokens):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{len(self.tokens) - 1})")
        return token_id


class IncrementalDecoder:
    """Streams generated tokens as text, holding back incomplete UTF-8 sequences.

    `push(id)` returns the text completed by that token (often ''); `flush()`
    returns what is left at the end (an unfinished sequence becomes U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.piece_bytes(token_id, self._special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _token_attrs(md: dict[str, Any], tokens: list[str]) -> list[int]:
    """Attribute bits per token from `tokenizer.ggml.token_type`; a byte token must read <0xNN>."""
    key = "tokenizer.ggml.token_type"
    types = keys.numbers(md, key, len(tokens), integers=True)
    if types is None:
        return [NORMAL] * len(tokens)
    known = (types >= 0) & (types < len(_TYPE_ATTR))
    for i in np.flatnonzero(types == 6).tolist():
        if not _BYTE_TOKEN.fullmatch(tokens[i]):
            raise keys.fail(key, f"marks token {i} ({tokens[i]!r:.40}) as a byte, but it is not <0xNN>")
    return np.where(known, _TYPE_ATTR[np.where(known, types, 0)], 0).tolist()


def _valid(text: str) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"encode() takes a str, not {type(text).__name__}: decode bytes first")
    return text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> '?'


def _clean_spaces(data: bytes) -> bytes:
    """Undo the tokenizer-era spacing: ' ,' -> ',', " ' " -> "'", " 's" -> "'s" ..."""
    out = bytearray(data[:1])  # 1: no space before ? ! . ,
    for i in range(1, len(data)):
        if data[i - 1] == 0x20 and data[i] in b"?!.,":
            out.pop()
        out.append(data[i])
    text, out = bytes(out), bytearray(out[:1])  # 2: a lone apostrophe between spaces
    i = 1
    while i < len(text):
        x = text[i]
        if x == 0x27 and i + 1 < len(text) and text[i - 1] == 0x20 and text[i + 1] == 0x20:
            out.pop()
            out.append(x)
            i += 2
            if i < len(text):  # the character after the dropped space has no space before it
                out.append(text[i])
            i += 1
            continue
        out.append(x)
        i += 1
    text, out = bytes(out), bytearray(out[:1])  # 3: contractions 's 'm 're 've
    for i in range(1, len(text)):
        if text[i - 1] == 0x20 and text[i] == 0x27 and i + 1 < len(text):
            rest = text[i + 1:i + 3]
            if rest[:1] in (b"s", b"m") or (len(rest) == 2 and rest in (b"re", b"ve")):
                out.pop()
        out.append(text[i])
    return bytes(out)
