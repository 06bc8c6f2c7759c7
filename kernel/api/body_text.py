"""Strings in a request body must be valid Unicode text.

JSON may carry a lone UTF-16 surrogate ("\\ud800"), which Python's json module accepts but no
UTF-8 encoder does: echoed in an error message it made the JSON response itself fail (a
plain-text 500), and in a prompt it would reach the tokenizer.  `check_text` walks the parsed
body (iteratively: depth costs no recursion) and answers 400 naming the first such field.
"""

from __future__ import annotations

from typing import Any

from ukgpu.kernel.api.errors import bad_request


def check_text(body: Any) -> None:
    """400 `invalid_text` when any key or string value holds a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            _check(path, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check(path, key)
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def _check(path: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        field = path or "body"  # made of keys already checked
        raise bad_request(f"'{field}' holds a lone surrogate (U+{ord(text[exc.start]):04X}), which "
                          "is not text; send valid UTF-8 / paired \\u escapes.", field, "invalid_text") from None
