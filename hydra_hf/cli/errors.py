"""User errors of the command-line tools: short messages, exit status 2, tracebacks only with `--debug`.

A *user error* is a bad flag, a bad configuration value, an unusable data source or output folder: something
the user fixes by changing the command, not a bug. The tools raise `UsageError` for those (as early as possible,
before tokenizer training and data loading) and `run_cli` turns it into ONE line on stderr, exit status 2::

    hydra-train: error: --max_steps=-5 is not allowed; allowed: an int >= 1, or -1 (train for training.num_train_epochs)

`--debug` re-raises instead (the traceback). argparse's own errors (unknown flag, `--max_steps abc`) are one
line too, with the same status.

Values are checked against the type annotations of the dataclass or function that will receive them
(`check_fields`), and against the ranges the tools accept (`check_range`), so the message names the field, the
value and what the field accepts.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import inspect
import sys
import types
import typing

EXIT_USAGE = 2


class UsageError(ValueError):
    """A user error (exit status 2). Subclasses `ValueError` so library callers can catch it as one."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a two-line error (no usage dump) and the same exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


MAX_MESSAGE_CHARS = 600


def one_line(exc) -> str:
    """An exception's (or a string's) whole message on one line: lines joined, whitespace collapsed.

    A multi-line message (YAML errors, transformers' "Couldn't instantiate the backend tokenizer from one of:"
    followed by the list) keeps its content instead of stopping mid-sentence; a very long one ends with "...".
    """
    text = exc if isinstance(exc, str) else (str(exc).strip() or type(exc).__name__)
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3].rstrip() + "..."



def run_cli(prog: str, body, debug: bool = False) -> int:
    """Run `body()` (returns an exit status); a `UsageError` becomes one line on stderr and status 2."""
    try:
        return body()
    except UsageError as exc:
        if debug:
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


# ---------------------------------------------------------------------------- type checks


def type_hints(obj) -> dict:
    """Annotations of a dataclass or function, evaluated one by one (a hint that cannot be evaluated,
    e.g. one naming a module the owner imports lazily, is left out)."""
    try:
        return typing.get_type_hints(obj)
    except Exception:
        pass
    annotations = {}
    for klass in reversed(getattr(obj, "__mro__", [obj])):
        annotations.update(getattr(klass, "__annotations__", {}) or {})
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    namespace = dict(vars(module)) if module else {}
    out = {}
    for name, hint in annotations.items():
        if isinstance(hint, str):
            try:
                hint = eval(hint, namespace)  # noqa: S307 - annotations of our own / transformers' classes
            except Exception:
                continue
        out[name] = hint
    return out


def _describe(hint) -> str:
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return "one of " + ", ".join(str(m.value) for m in hint)
        return hint.__name__
    return str(hint).replace("typing.", "")


def _matches(value, hint) -> tuple[bool, str | None]:
    """(accepted, message about allowed values or None)."""
    if hint is typing.Any or hint is None:
        return True, None
    if hint is type(None):
        return value is None, None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        enums = [o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)]
        if enums and isinstance(value, str):
            allowed = [str(m.value) for e in enums for m in e]
            if value in allowed:
                return True, None
            return False, "allowed: " + ", ".join(allowed)
        return any(_matches(value, o)[0] for o in options), None
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        return value in allowed, "allowed: " + ", ".join(map(str, allowed))
    if origin in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple)):
            return False, None
        item = typing.get_args(hint)[:1]
        return all(_matches(v, item[0])[0] for v in value) if item and item[0] is not Ellipsis else True, None
    if origin is dict or typing.is_typeddict(hint):  # a TypedDict (e.g. RopeParameters) refuses isinstance
        return isinstance(value, dict), None
    if not isinstance(hint, type):
        return True, None
    if hint is bool:
        return isinstance(value, bool), None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), None
    if issubclass(hint, enum.Enum):
        allowed = [str(m.value) for m in hint]
        return isinstance(value, hint) or value in allowed, "allowed: " + ", ".join(allowed)
    if hint in (list, tuple):
        return isinstance(value, (list, tuple)), None
    return isinstance(value, hint), None


def check_fields(values: dict, owner, section: str, allow_unknown: bool = False) -> None:
    """Check `values` against the fields / parameters of `owner` (a dataclass or a function).

    Raises `UsageError` naming `section.key`, the value and the accepted type or values."""
    hints = type_hints(owner)
    hints.pop("return", None)
    known = set(hints)
    if not isinstance(owner, type):  # a function: every parameter is known, annotated or not
        known |= {n for n, p in inspect.signature(owner).parameters.items()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    owner_name = getattr(owner, "__qualname__", str(owner)).replace(".__init__", "")
    for key, value in values.items():
        if key not in known:
            if allow_unknown:
                continue
            names = sorted(k for k in known if not k.startswith("_"))
            close = difflib.get_close_matches(key, names, n=3)
            if close:
                allowed = f"did you mean {' or '.join(close)}?"
            elif len(names) > 15:
                allowed = f"see the {len(names)} fields of {owner_name} in its documentation"
            else:
                allowed = "allowed: " + ", ".join(names)
            raise UsageError(f"{section}.{key}: unknown field of {owner_name}; {allowed}")
        if key not in hints:
            continue
        ok, allowed = _matches(value, hints[key])
        if not ok:
            expected = allowed or f"expected {_describe(hints[key])}"
            raise UsageError(f"{section}.{key}={value!r} is not valid for {owner_name}.{key}; {expected}")


def check_choice(value, allowed, name: str) -> None:
    if value not in allowed:
        raise UsageError(f"{name}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(value, name: str, *, minimum=None, maximum=None, min_exclusive: bool = False,
                max_exclusive: bool = False, also=(), integer: bool = False, note: str = "") -> None:
    """`value` must be a number within [minimum, maximum] (bounds optional, each inclusive unless `*_exclusive`),
    or one of `also` (special values, e.g. -1 = "not set"). Raises `UsageError` naming `name`, the value and the
    allowed range, e.g. ``--lr=-0.001 is not allowed; allowed: a number > 0``."""
    kind = "an int" if integer else "a number"
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if min_exclusive else '>='} {minimum}")
    if maximum is not None:
        bounds.append(f"{'<' if max_exclusive else '<='} {maximum}")
    allowed = f"{kind} {' and '.join(bounds)}".strip()
    if also:
        allowed += ", or " + " or ".join(map(str, also))
    if note:
        allowed += f" ({note})"
    if any(value is a or (_is_number(value) and _is_number(a) and value == a) for a in also):
        return
    ok = _is_number(value) and (isinstance(value, int) or not integer)
    if ok and isinstance(value, float) and value != value:  # NaN
        ok = False
    if ok and minimum is not None:
        ok = value > minimum if min_exclusive else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_exclusive else value <= maximum
    if not ok:
        raise UsageError(f"{name}={value!r} is not allowed; allowed: {allowed}")


__all__ = ["ArgumentParser", "EXIT_USAGE", "UsageError", "check_choice", "check_fields", "check_range", "one_line",
           "run_cli", "type_hints"]
