"""The generation loop: sequences in KV slots, advanced one step at a time.

    engine = Engine.load("smollm2-135m", backend="auto", n_ctx=2048, n_slots=1)
    seq = engine.start(prompt_ids, SamplingParams(temperature=0), max_tokens=64, stop=["\\n\\n"])
    while seq.finish_reason is None:
        for event in engine.step(seq):      # first step: the prompt in one batched forward
            print(event.text, end="")
    engine.release(seq)

`step` never waits on anything but the forward pass, so a server can interleave
the sequences of several slots; `step_all` advances them together, decoding up to
the backend's `max_batch` sequences in one forward pass.  A released slot remembers the token ids whose
keys and values it holds; `start` puts a new prompt in the free slot sharing the
longest leading run of tokens with it and prefills only the rest (multi-turn
chats resend their history), so `Stats.cached_tokens` of the prompt are never
re-evaluated.  A prefill also copies in a longer prefix held by a live sequence
(`Backend.copy_kv`): the n choices of one prompt prefill it once.  Text is streamed through the tokenizer's
incremental decoder; text that might be the beginning of a stop string is held
back until it is clear, and a stop string itself is never emitted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np

from ukgpu.llama_core.backend import Backend
from ukgpu.llama_core.backend_choice import check_kind, cpu_fallback, open_backend
from ukgpu.llama_core.embedding import embed
from ukgpu.llama_core.errors import DeviceError, UkgpuError
from ukgpu.llama_core.gguf.file import GGUFFile, open_gguf
from ukgpu.llama_core.logprobs import token_logprob
from ukgpu.llama_core.model import Model
from ukgpu.llama_core.sampling import Sampler, SamplingParams
from ukgpu.llama_core.sequence import Sequence, Stats, TokenEvent, common_prefix_len, find_stop, stop_prefix_len
from ukgpu.llama_core.text.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["ContextFullError", "Engine", "EngineError", "NoFreeSlotError", "Sequence", "Stats", "TokenEvent"]


class EngineError(UkgpuError):
    """A request the engine cannot take."""


class ContextFullError(EngineError):
    """Prompt plus max_tokens do not fit the context (the numbers are kept for callers)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        super().__init__(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the "
                         f"context of {n_ctx} tokens: shorten the prompt, lower max_tokens or load "
                         "the engine with a larger n_ctx")
        self.prompt_tokens, self.max_tokens, self.n_ctx = prompt_tokens, max_tokens, n_ctx


class NoFreeSlotError(EngineError):
    """Every KV slot is in use."""


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, n_ctx: int, n_slots: int,
                 backend_note: str = "", fallback: Callable[[], Backend] | None = None) -> None:
        """fallback: makes the backend to continue on when the model's device fails at run
        time (`DeviceError`); None lets the error reach the caller."""
        self.model = model
        self.fallback = fallback
        self._live: dict[int, Sequence] = {}  # slot -> the sequence that owns it
        self.gguf = model.gguf
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.n_slots = n_slots
        self._backend_note = backend_note
        self.stats = Stats()
        self._kv = [model.new_kv(n_ctx) for _ in range(n_slots)]
        self._free = list(range(n_slots))
        # per slot, the token ids whose keys/values its cache holds at positions 0..; kept
        # while the slot is free, empty while a sequence owns it (release writes it back)
        self._held: list[list[int]] = [[] for _ in range(n_slots)]

    @classmethod
    def load(cls, model: str | Path | GGUFFile | Model, backend: str | Backend = "auto",
             n_ctx: int = 2048, n_slots: int = 1,
             fallback: Callable[[], Backend] | None = None) -> Engine:
        """An engine for a model name, path, opened GGUF file or Model.  backend: "cpu",
        "auto" (CUDA when usable, else the CPU with one line on stderr saying why; a CUDA
        failure that loses the GPU context while running moves every sequence to the CPU, any
        other fails its request), "cuda" (raises when unusable
        or failing) or a Backend instance (with `fallback`, the backend to move to when it
        fails while running).  The choice itself: `backend_choice.open_backend`."""
        if n_ctx < 2 or n_slots < 1:
            raise EngineError(f"n_ctx={n_ctx}, n_slots={n_slots}: need n_ctx >= 2 and n_slots >= 1")
        if isinstance(model, Model):
            note = model.backend.name
        else:
            gguf = model if isinstance(model, GGUFFile) else open_gguf(_resolve(str(model)))
            if isinstance(backend, Backend):
                chosen, note = backend, backend.name
            else:
                check_kind(backend, EngineError)
                chosen, note = open_backend(backend, gguf, n_ctx=n_ctx, n_slots=n_slots)
                if backend != "cpu":  # which device answers, or why not the GPU
                    print(f"ukgpu: {note}", file=sys.stderr)
                fallback = cpu_fallback(backend, chosen) or fallback  # "auto": run-time failures too
            model = Model(gguf, chosen)
        return cls(model, Tokenizer.from_gguf(model.gguf), n_ctx, n_slots, note, fallback)

    @property
    def backend_note(self) -> str:
        """Which backend answers and why, then what it changed while running (`runtime_note`:
        e.g. CUDA decode gone eager after a refused graph capture)."""
        extra = self.model.backend.runtime_note()
        return f"{self._backend_note}; {extra}" if extra else self._backend_note

    @backend_note.setter
    def backend_note(self, note: str) -> None:
        self._backend_note = note

    # --- requests ----------------------------------------------------------
    def start(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
              max_tokens: int = 256, stop: Seq[str] = ()) -> Sequence:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise EngineError("the prompt is empty: give at least one token")
        if max_tokens < 1:
            raise EngineError(f"max_tokens={max_tokens}: ask for at least one token")
        self.room(len(prompt), max_tokens)
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise EngineError(f"prompt token ids must lie in [0, {vocab}): check the tokenizer")
        if not self._free:
            raise NoFreeSlotError(f"all {self.n_slots} slots are busy: release a sequence or "
                                  "load the engine with more n_slots")
        slot, reused = self._pick_slot(prompt)
        self._free.remove(slot)
        self._held[slot] = []
        params = params or SamplingParams()
        seq = Sequence(prompt, params, max_tokens, [s for s in stop if s], slot, self._kv[slot],
                       Sampler(params), IncrementalDecoder(self.tokenizer), tokens=list(prompt),
                       n_cached=reused)
        self._live[slot] = seq
        return seq

    def room(self, n_prompt: int, max_tokens: int = 1) -> int:
        """Tokens a prompt of n_prompt leaves for generation; ContextFullError below max_tokens.
        The one context check (`start` and the HTTP API ask here); reads only n_ctx: any thread."""
        if self.n_ctx - n_prompt < max_tokens:
            raise ContextFullError(n_prompt, max_tokens, self.n_ctx)
        return self.n_ctx - n_prompt

    def release(self, seq: Sequence) -> None:
        """Give the sequence's KV slot back (idempotent).  The slot keeps the ids of the
        tokens that went through the model, for a later prompt that begins with them;
        after a failed forward pass it keeps none."""
        if seq.slot >= 0:
            self._held[seq.slot] = [] if seq.kv_suspect else seq.tokens[:seq.n_cached]
            self._free.append(seq.slot)
            self._live.pop(seq.slot, None)
            seq.slot = -1
        if seq.finish_reason is None:
            seq.finish_reason = "cancelled"

    def step(self, seq: Sequence) -> list[TokenEvent]:
        """Run one forward pass (the first time: the prompt, less the prefix the slot already
        held), sample one token and return what it releases; [] once the sequence has finished."""
        if seq.finish_reason is not None:
            return []
        try:
            try:
                token = self._next_token(seq)
            except DeviceError as exc:
                if not self._fall_back(exc):
                    raise
                token = self._next_token(seq)  # on the CPU now: re-prefills this sequence
        except BaseException:  # errors and interrupts alike: the slot's cache is not trusted
            seq.kv_suspect = True
            raise
        return self._emit(seq, token)

    def step_all(self, seqs: Seq[Sequence]) -> list[list[TokenEvent] | Exception]:
        """One `step` of every sequence, in order.  Sequences past their prompt decode together,
        up to the backend's `max_batch` per forward pass (`Backend.decode_batch`: each weight is
        read once for the group); the others step alone.  A sequence's failure comes back in
        its place, so the rest go on; an interrupt is raised."""
        out: list[list[TokenEvent] | Exception | None] = [None] * len(seqs)
        size = self.model.backend.max_batch
        ready = [i for i, s in enumerate(seqs) if s.finish_reason is None and s.prefilled]
        groups = [ready[k:k + size] for k in range(0, len(ready), size)] if size > 1 else []
        for group in (g for g in groups if len(g) > 1):
            batch = [seqs[i] for i in group]
            try:
                tokens = self._decode_batch(batch)
            except Exception as exc:  # noqa: BLE001 - every sequence of the group gets it
                if not (isinstance(exc, DeviceError) and self._fall_back(exc)):
                    for i in group:
                        out[i] = exc
                continue  # after a fallback to the CPU: these sequences step (re-prefill) below
            for i, seq, token in zip(group, batch, tokens):
                try:  # e.g. an id the tokenizer cannot decode fails this sequence alone
                    out[i] = self._emit(seq, token)
                except Exception as exc:  # noqa: BLE001 - reported in its place
                    out[i] = exc
        for i, seq in enumerate(seqs):
            if out[i] is None:
                try:
                    out[i] = self.step(seq)
                except Exception as exc:  # noqa: BLE001 - reported in its place
                    out[i] = exc
        return out  # type: ignore[return-value]

    def _decode_batch(self, seqs: list[Sequence]) -> list[int]:
        """Sample the next token of each sequence from one batched forward pass."""
        t0 = time.perf_counter()
        try:
            logits = self.model.backend.decode_batch(self.model, np.array([s.tokens[-1] for s in seqs]),
                                                     [s.n_cached for s in seqs], [s.kv for s in seqs])
        except BaseException:
            for seq in seqs:
                seq.kv_suspect = True
            raise
        seconds = time.perf_counter() - t0
        self.stats.decode_seconds += seconds
        tokens = []
        for row, seq in zip(logits, seqs):  # each waited for the whole pass
            seq.n_cached += 1
            seq.stats.decode_seconds += seconds
            tokens.append(self._sample(seq, row))
        return tokens

    def _sample(self, seq: Sequence, logits: np.ndarray) -> int:
        """The sampler's choice from logits[vocab]; keeps its logprob when the params ask."""
        k = seq.params.logprobs
        masked = seq.sampler.constrain(logits) if k is not None else logits  # before sampling moves
        token = int(seq.sampler(logits, seq.tokens))  # the grammar on (it keeps the mask it made)
        if k is not None:
            seq.logprob = token_logprob(masked, token, k, self.tokenizer.token_bytes)
        return token

    def _emit(self, seq: Sequence, token: int) -> list[TokenEvent]:
        """Append a sampled token and return the events it releases, the token's logprob on the
        last (an end-of-text token has none: its text is not in the output)."""
        info, seq.logprob = seq.logprob, None
        events = self._release(seq, token)
        if token not in self.tokenizer.eog_ids:
            events[-1].logprob = info
        return events

    def _release(self, seq: Sequence, token: int) -> list[TokenEvent]:
        """Append a sampled token and return the events it releases (finish, stop strings)."""
        seq.tokens.append(token)
        seq.stats.generated_tokens += 1
        self.stats.generated_tokens += 1
        if token in self.tokenizer.eog_ids:
            return [self._finish(seq, token, "stop")]
        seq.held += seq.decoder.push(token)
        cut = find_stop(seq.held, seq.stop)
        if cut is not None:
            seq.held = seq.held[:cut]
            return [self._finish(seq, token, "stop", flush=False)]
        if len(seq.generated) >= seq.max_tokens:
            return [self._finish(seq, token, "length")]
        keep = stop_prefix_len(seq.held, seq.stop)
        text, seq.held = seq.held[:len(seq.held) - keep], seq.held[len(seq.held) - keep:]
        return [TokenEvent(token, text)]

    def generate(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
                 max_tokens: int = 256, stop: Seq[str] = ()) -> Iterator[TokenEvent]:
        """Every event of one request; the slot is released when the iterator ends."""
        seq = self.start(prompt_ids, params, max_tokens, stop)
        try:
            while seq.finish_reason is None:
                yield from self.step(seq)
        finally:
            self.release(seq)

    def chat(self, messages: Seq[Mapping[str, Any]], params: SamplingParams | None = None,
             max_tokens: int = 256, stop: Seq[str] = ()) -> Iterator[TokenEvent]:
        """`generate` on the model's chat template applied to messages."""
        return self.generate(self.chat_ids(messages), params, max_tokens, stop)

    def embed(self, ids: Seq[int]) -> np.ndarray:
        """ids' pooled, unit-length embedding (`llama_core.embedding`); on the stepping thread."""
        return embed(self.model, ids)

    def chat_ids(self, messages: Seq[Mapping[str, Any]], **context: Any) -> list[int]:
        """The chat template applied to messages, as ids (`ChatTemplateError` if it refuses): the
        one path for chat prompts.  It touches no slot, so it may run off the stepping thread.
        context: more template variables, e.g. tools=[function definitions]."""
        from ukgpu.llama_core.text.chat import chat_ids

        return chat_ids(self.tokenizer, self.gguf, messages, **context)  # special-token text stays text

    # --- internals ---------------------------------------------------------
    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """(free slot, prompt tokens it can reuse): the longest common prefix with what a
        slot holds, first free slot on ties.  The last prompt token is always evaluated
        again, since sampling needs its logits."""
        best, best_len = self._free[0], 0
        for slot in self._free:
            n = common_prefix_len(self._held[slot], prompt)
            if n > best_len:
                best, best_len = slot, n
        return best, min(best_len, len(prompt) - 1)

    def _next_token(self, seq: Sequence) -> int:
        """Sample the next token; a plain greedy decode step is the backend's `decode_greedy`
        (the argmax the sampler would take; CUDA graphs compute it without copying logits back)."""
        p = seq.params
        plain_greedy = p.greedy and p.repeat_penalty == 1 and p.logprobs is None and not (
            p.presence_penalty or p.frequency_penalty) and p.grammar is None  # these need the logits
        if seq.prefilled and plain_greedy:
            t0 = time.perf_counter()
            token = self.model.backend.decode_greedy(self.model, seq.tokens[-1], seq.n_cached,
                                                     seq.kv)
            self._count_decode(seq, time.perf_counter() - t0)
            return int(token)
        return self._sample(seq, self._forward(seq))

    def _count_decode(self, seq: Sequence, seconds: float) -> None:
        seq.n_cached += 1
        seq.stats.decode_seconds += seconds
        self.stats.decode_seconds += seconds

    def _forward(self, seq: Sequence) -> np.ndarray:
        t0 = time.perf_counter()
        if not seq.prefilled:  # the tokens the slot does not hold yet (the prompt), in one pass
            self._share_prefix(seq)
            start, first = seq.n_cached, not seq.generated
            logits = self.model.forward(np.asarray(seq.tokens[start:]), start, seq.kv,
                                        all_logits=False)
            seq.n_cached = len(seq.tokens)
            done = Stats(prompt_tokens=seq.n_cached if first else 0,
                         prefill_seconds=time.perf_counter() - t0, cached_tokens=start)
            seq.stats.add(done)
            self.stats.add(done)
        else:  # one token: the backend's decode step (a graph replay on CUDA)
            logits = self.model.backend.decode(self.model, seq.tokens[-1], seq.n_cached, seq.kv)
            self._count_decode(seq, time.perf_counter() - t0)
        return logits[-1]  # [vocab]

    def _share_prefix(self, seq: Sequence) -> None:
        """Before a prefill: copy in the keys and values of the longest prompt prefix another live
        sequence holds beyond what seq's slot has (the n choices of one request, started together,
        prefill once; so do requests opening with one system prompt).  The last prompt token is
        still evaluated: sampling needs its logits."""
        donor, best = None, seq.n_cached
        for other in self._live.values():
            if other is seq or other.kv_suspect or other.n_cached <= best:
                continue
            n = min(common_prefix_len(other.tokens[:other.n_cached], seq.tokens), len(seq.tokens) - 1)
            if n > best:
                donor, best = other, n
        if donor is not None:
            self.model.backend.copy_kv(donor.kv, seq.kv, best)
            seq.n_cached = best

    def _fall_back(self, exc: DeviceError) -> bool:
        """After a sticky device failure (the device's context is lost): rebuild the model on the
        fallback backend, give every slot a fresh cache and make each live sequence re-prefill
        its tokens there.  False when this engine has no fallback (the caller asked for that
        device) or the device is still usable (a refused call, memory for one request): that
        request fails and the engine stays on its device."""
        if self.fallback is None or not exc.sticky:
            return False
        failed = self.model.backend
        note = f"{failed.name} failed while running ({exc}); continuing on the CPU"
        print(f"ukgpu: {note}", file=sys.stderr)
        self.model = Model(self.gguf, self.fallback())
        self.fallback, self.backend_note = None, f"backend: cpu ({note})"
        self._kv = [self.model.new_kv(self.n_ctx) for _ in range(self.n_slots)]
        self._held = [[] for _ in range(self.n_slots)]
        for slot, seq in self._live.items():
            seq.kv, seq.n_cached, seq.kv_suspect = self._kv[slot], 0, False
        try:
            failed.close()
        except Exception:  # noqa: BLE001 - the device is already broken; nothing more to free
            pass
        return True

    def _finish(self, seq: Sequence, token: int, reason: str, flush: bool = True) -> TokenEvent:
        text = seq.held + (seq.decoder.flush() if flush else "")
        seq.held = ""
        seq.finish_reason = reason
        return TokenEvent(token, text, reason)


def _resolve(name: str):
    """A model name or path -> its file (the registry, tqdm and friends load only for a name)."""
    from ukgpu.llama_core.models.registry import resolve_model

    return resolve_model(name)
