"""Streaming a chat reply while tools are on: text as soon as it cannot begin a call, each tool
call as one delta the moment its block closes.

The reply arrives as growing text.  Outside a `<tool_call>` block, text is streamed as content
except a tail that could be the start of the opening tag (held until the next text settles
it).  A block, once closed, becomes one `delta.tool_calls` entry (its index, id, name and whole
arguments, which are re-serialized JSON and so are not split); a block that is not a valid call
streams as the text it is.  A reply that opens with `{` or `[` may be a call written without tags
(Llama 3's bare object, Mistral's list after its dropped `[TOOL_CALLS]` token), so it is held
until the reply ends and then judged whole (`structured.final_delta`).  Whitespace
between calls is dropped, as in the non-streamed message.
"""

from __future__ import annotations

import uuid

from ukgpu.kernel.api import structured
from ukgpu.llama_core.text.tool_calls import CLOSE, OPEN, parse


class ToolStream:
    """Deltas of one choice's reply (`feed` the whole text so far each time)."""

    def __init__(self) -> None:
        self.sent = 0  # characters of the text already turned into deltas
        self.calls = 0  # tool calls streamed
        self.bare: bool | None = None  # the reply opened with "{": judged whole at the end
        self._spaces = ""  # whitespace held back: sent only if more content follows
        self._content_sent = False

    def feed(self, text: str, done: bool) -> list[dict]:
        """The deltas the text now settles (content and tool-call deltas, in order)."""
        if self.bare is None and text.strip():
            self.bare = text.lstrip()[0] in "{["  # Llama 3's bare object, Mistral's list of calls
        if self.bare:
            if not done:
                return []
            delta, called = structured.final_delta(text)
            self.calls += len(delta.get("tool_calls", [])) if called else 0
            self.sent = len(text)
            return [delta] if delta else []
        deltas: list[dict] = []
        while True:
            start = text.find(OPEN, self.sent)
            if start < 0:
                end = len(text) if done else len(text) - _open_prefix_len(text, self.sent)
                self._content(text[self.sent:end], deltas)
                self.sent = end
                return deltas
            self._content(text[self.sent:start], deltas)
            self.sent = start
            close = text.find(CLOSE, start)
            if close < 0:
                if done:  # an unterminated block is text
                    self._content(text[start:], deltas)
                    self.sent = len(text)
                return deltas
            self.sent = close + len(CLOSE)
            self._block(text[start:self.sent], deltas)

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self.calls else engine_reason

    def _block(self, block: str, deltas: list[dict]) -> None:
        _, calls = parse(block)
        if not calls:
            self._content(block, deltas)
            return
        for call in calls:
            deltas.append({"tool_calls": [{
                "index": self.calls, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}]})
            self.calls += 1
        self._spaces = ""

    def _content(self, piece: str, deltas: list[dict]) -> None:
        if not piece:
            return
        if not piece.strip():
            self._spaces += piece
            return
        piece = self._spaces + piece if self._content_sent else piece.lstrip()
        self._spaces = ""
        self._content_sent = True
        if deltas and "content" in deltas[-1] and "tool_calls" not in deltas[-1]:
            deltas[-1]["content"] += piece
        else:
            deltas.append({"content": piece})


def _open_prefix_len(text: str, since: int) -> int:
    """Length of the longest tail of text[since:] that is a proper prefix of the opening tag."""
    for n in range(min(len(OPEN) - 1, len(text) - since), 0, -1):
        if OPEN.startswith(text[len(text) - n:]):
            return n
    return 0
