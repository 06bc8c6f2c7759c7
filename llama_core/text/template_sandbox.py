"""Chat templates run with bounded time, memory and recursion.

A chat template comes from the model file and runs on every chat request, so a hostile one
must not take the server down (a nested loop reached 2.4 GB in 38 s; a recursive macro
raised RecursionError).  Jinja's sandbox refuses unsafe attributes but not loops, growth or
recursion, so on top of it, for one render (`GuardedTemplate.render`):

- time: a deadline (MAX_SECONDS) checked at every loop iteration, call, filter, operator,
  attribute and item access, and a cap on loop iterations (MAX_ITERATIONS) that does not
  depend on the machine's speed;
- size: every value the template makes (literal lists and dicts, `~`, operators, filter and
  method results, captured blocks and macro output, the output itself) is measured when it
  is made, and the operations that multiply sizes (`*`, `**`, `%` and format widths,
  `replace`, `join`, `indent`, `wordwrap`, width arguments, `tojson`) are checked before
  they run, so no value outgrows the limit (OUTPUT_FLOOR plus OUTPUT_FACTOR times the
  size of the messages and other variables);
- recursion: calls may nest MAX_DEPTH deep.

`{% for %}` loops and `~` compile to plain Python loops and joins, so `guard_ast` routes them
through guard filters in the parsed template before it is compiled.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from ukgpu.llama_core.errors import TokenizerError

MAX_SECONDS = 2.0
MAX_ITERATIONS = 1 << 20
MAX_DEPTH = 100
MAX_INT_BITS = 1 << 16
OUTPUT_FLOOR = 1 << 20  # characters, plus OUTPUT_FACTOR x the variables' size
OUTPUT_FACTOR = 4
_UNSAFE_STR_METHODS = frozenset({"expandtabs", "translate", "maketrans", "format_map"})


class ChatTemplateError(TokenizerError):
    """A chat template cannot be compiled or rendered for the given messages."""


class TemplateLimitError(ChatTemplateError):
    """A chat template ran past its time, size, iteration or recursion limit."""


def _limit(what: str) -> TemplateLimitError:
    return TemplateLimitError(f"the chat template {what}: it is broken or hostile; fix"
                              " tokenizer.chat_template or pass a template of your own")


def size(value: Any, limit: int) -> int:
    """About how many characters `value` renders to, counted until past `limit`.  A container
    counts every item each time it holds it, as str() and join would, so a list holding one
    string a thousand times counts it a thousand times: sharing cannot hide growth.  Dict views
    and namespaces print what they hold, so they count it too."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 1
        elif isinstance(item, range):
            total += 8 * len(item)
        elif isinstance(item, Namespace):
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        elif isinstance(item, Collection):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item.items() if isinstance(item, Mapping) else item)
        else:
            total += 8
    return total


class Budget:
    """The limits of one render and what it has used of them."""

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self.seconds = MAX_SECONDS
        self.deadline = time.monotonic() + self.seconds
        self.iterations = 0
        self.depth = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _limit(f"ran for more than {self.seconds:g} s")

    def step(self) -> None:
        self.iterations += 1
        if self.iterations > MAX_ITERATIONS:
            raise _limit(f"ran more than {MAX_ITERATIONS} loop iterations")
        self.tick()

    def room(self, chars: int, what: str) -> None:
        if chars > self.max_chars:
            raise _limit(f"{what} would make {chars} characters (at most {self.max_chars} here)")

    def sized(self, value: Any, what: str = "a value") -> Any:
        self.room(size(value, self.max_chars), what)
        return value


_local = threading.local()


def current() -> Budget:
    """The budget of the render running in this thread; outside a render (Jinja folds constant
    expressions while compiling, filters included) a fresh one with the smallest limits."""
    return getattr(_local, "budget", None) or Budget(OUTPUT_FLOOR)


@contextmanager
def budget_for(variables: dict[str, Any]) -> Iterator[Budget]:
    budget = Budget(OUTPUT_FLOOR + OUTPUT_FACTOR * size(variables, 1 << 40))
    outer, _local.budget = getattr(_local, "budget", None), budget
    try:
        yield budget
    finally:
        _local.budget = outer


def _ints_ok(values: Any, budget: Budget) -> None:
    """Integer arguments of filters, string methods and formats are widths and counts: each must
    fit the size limit (`center(10**9)`, `batch(10**9, fill)`)."""
    for value in values:
        if isinstance(value, int):
            budget.room(abs(value), f"a width or count of {value}")


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")


def _format_ok(fmt: Any, budget: Budget) -> None:
    """Widths written into a printf or str.format string (`%99999999d`, `{:>99999999}`)."""
    if isinstance(fmt, str):
        widths = [w for m in _PRINTF_SPEC.finditer(fmt) for w in m.groups() if w]
        widths += [w for m in _FORMAT_SPEC.finditer(fmt) for w in re.findall(r"\d+", m.group(1))]
        _ints_ok((int(w) if len(w) < 10 else 1 << 40 for w in widths), budget)


def _growth_of_replace(s: Any, old: Any, new: Any, budget: Budget) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        hits = len(s) + 1 if not old else s.count(old)
        budget.room(len(s) + hits * max(0, len(new) - len(old)), "replace()")


def _joined(items: Any, sep: Any, budget: Budget) -> list:
    items = list(items)
    budget.room(size(items, budget.max_chars) + len(items) * len(str(sep)), "join()")
    return items


class GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with this module's limits on calls, operators and attribute access."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    @staticmethod
    def concat(pieces: Any) -> str:  # output, captured blocks, macro bodies
        budget, out, total = current(), [], 0
        for piece in pieces:
            total += len(piece)
            if total > budget.max_chars:
                budget.room(total, "output")
            out.append(piece)
        return "".join(out)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr in _UNSAFE_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = current()
        budget.tick()
        args = _checked_str_call(__obj, args, kwargs, budget)
        budget.depth += 1
        try:
            if budget.depth > MAX_DEPTH:
                raise _limit(f"nested calls more than {MAX_DEPTH} deep (a recursive macro?)")
            return budget.sized(super().call(__context, __obj, *args, **kwargs), "a call")
        finally:
            budget.depth -= 1

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = current()
        budget.tick()
        _binop_ok(operator, left, right, budget)
        return budget.sized(super().call_binop(context, operator, left, right), f"'{operator}'")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """The sandbox's str.format, with the widths in the format string and its arguments checked."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        def checked(*args: Any, **kwargs: Any) -> str:
            budget = current()
            _format_ok(value.__self__, budget)
            _ints_ok([*args, *kwargs.values()], budget)
            return wrapped(*args, **kwargs)

        return checked

    def getattr(self, obj: Any, attribute: str) -> Any:
        current().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        current().tick()
        return super().getitem(obj, argument)


def _checked_str_call(func: Any, args: tuple, kwargs: dict, budget: Budget) -> tuple:
    """Pre-checks of the string methods that can multiply sizes; the (possibly listed) args."""
    owner, name = getattr(func, "__self__", None), getattr(func, "__name__", "")
    if not isinstance(owner, str):
        return args
    _ints_ok([*args, *kwargs.values()], budget)
    if name == "replace" and len(args) >= 2:
        _growth_of_replace(owner, args[0], args[1], budget)
    elif name == "join" and args:
        args = (_joined(args[0], owner, budget), *args[1:])
    return args


def _binop_ok(operator: str, left: Any, right: Any, budget: Budget) -> None:
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "*" and ints:
        budget.room((left.bit_length() + right.bit_length()) // 3, "an integer product")
    elif operator == "*" and (isinstance(left, int) or isinstance(right, int)):
        count, seq = (left, right) if isinstance(left, int) else (right, left)
        budget.room(max(0, count) * size(seq, budget.max_chars), "'*'")
    elif operator == "**" and ints and right > 0 and abs(left) > 1:
        budget.room(left.bit_length() * right // 3 if right < 1 << 40 else 1 << 40, "'**'")
    elif operator == "%" and isinstance(left, str):
        _format_ok(left, budget)
        _ints_ok(right.values() if isinstance(right, dict) else right if isinstance(right, tuple) else (right,),
                 budget)


# filter name -> pre-check of its bound arguments; may replace arguments (join lists its items)
def _check_join(a: dict, budget: Budget) -> None:
    a["value"] = _joined(a["value"], a.get("d", ""), budget)


def _check_indent(a: dict, budget: Budget) -> None:
    width = a.get("width", 4)
    lines = a["s"].count("\n") + 1 if isinstance(a["s"], str) else 1
    budget.room(lines * (len(width) if isinstance(width, str) else max(0, width)), "indent()")


def _check_wordwrap(a: dict, budget: Budget) -> None:
    text, wrap = str(a["s"]), a.get("wrapstring") or "\n"
    budget.room(len(text) + (len(text) // max(1, a.get("width", 79)) + 1) * len(wrap), "wordwrap()")


def _check_sum(a: dict, budget: Budget) -> None:
    if not isinstance(a.get("start", 0), (int, float)):
        raise ChatTemplateError("the chat template sums lists or strings (sum(start=...)): use join instead")


def _check_urlize(a: dict, budget: Budget) -> None:
    if len(str(a.get("target") or "")) + len(str(a.get("rel") or "")) > 256:
        budget.room(1 << 40, "urlize() with a long target or rel")


_FILTER_CHECKS: dict[str, Callable[[dict, Budget], None]] = {
    "replace": lambda a, b: _growth_of_replace(a["s"], a["old"], a["new"], b),
    "join": _check_join, "indent": _check_indent, "wordwrap": _check_wordwrap, "sum": _check_sum,
    "format": lambda a, b: _format_ok(a["value"], b), "urlize": _check_urlize,
}


def guard_filter(name: str, func: Callable) -> Callable:
    """`func` with the deadline, the width/count check, its own pre-check and a size check."""
    check = _FILTER_CHECKS.get(name)
    signature = inspect.signature(func)

    first_option = 2 if getattr(func, "jinja_pass_arg", None) else 1  # after the context and the value

    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = current()
        budget.tick()
        _ints_ok([*args[first_option:], *kwargs.values()], budget)
        if check is not None:
            bound = signature.bind(*args, **kwargs)
            check(bound.arguments, budget)
            args, kwargs = bound.args, bound.kwargs
        return budget.sized(func(*args, **kwargs), f"the filter {name!r}")

    return guarded


def tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson (non-ASCII text and <>& kept as they are), built piece by piece
    against the budget: indentation multiplies with depth, so its size is only known as it grows."""
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    budget, out, total = current(), [], 0
    for piece in encoder.iterencode(value):
        total += len(piece)
        budget.room(total, "tojson")
        out.append(piece)
    return "".join(out)


@jinja2.pass_context
def _guard_loop(context: Any, iterable: Any) -> Iterator[Any]:
    budget = current()
    for item in iterable:
        budget.step()
        yield item


@jinja2.pass_context
def _guard_concat(context: Any, values: list) -> str:
    parts = [v if isinstance(v, str) else str(v) for v in values]
    current().room(sum(map(len, parts)), "'~'")
    return "".join(parts)


def _guard_literal(value: Any) -> Any:
    return current().sized(value, "a literal")


GUARD_FILTERS = {"__ukgpu_loop": _guard_loop, "__ukgpu_concat": _guard_concat, "__ukgpu_literal": _guard_literal}


def _filtered(node: nodes.Node, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Guard(NodeTransformer):
    """Loops iterate through `__ukgpu_loop`, `~` joins through `__ukgpu_concat`, and literal
    lists, tuples and dicts are measured by `__ukgpu_literal`."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)  # rewrites the children in place
        node.iter = _filtered(node.iter, "__ukgpu_loop")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return _filtered(nodes.List(node.nodes, lineno=node.lineno), "__ukgpu_concat")

    def visit_List(self, node: nodes.Expr) -> nodes.Expr:
        self.generic_visit(node)
        return node if getattr(node, "ctx", "load") != "load" else _filtered(node, "__ukgpu_literal")

    visit_Tuple = visit_Dict = visit_List


def guard_ast(ast: nodes.Template) -> nodes.Template:
    return _Guard().visit(ast)


class GuardedTemplate(jinja2.Template):
    """A template whose every render runs under a fresh Budget."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        with budget_for(dict(*args, **kwargs)):
            return super().render(*args, **kwargs)
