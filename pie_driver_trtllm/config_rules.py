"""The rules of config.py's Structs in words: one line for a value msgspec refuses, and the docs table.

msgspec names the path of a bad value (`$.driver.options.lookahead_tokens`) but neither the value nor
everything that would be allowed; both come from the document and from the field's own annotation, so a
message reads `driver.options.lookahead_tokens = 17 is out of range; expected 1..16`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

import msgspec
import msgspec.inspect as mi

PATTERN_WORDS = {r"^(cpu|cuda(:\d+)?)$": '"cpu", "cuda" or "cuda:N"'}  # how a regex rule reads to a user
_KIND = {mi.IntType: "integer", mi.FloatType: "number", mi.BoolType: "boolean", mi.StrType: "string",
         mi.ListType: "array", mi.DictType: "table", mi.StructType: "table"}
_VALUE_KIND = {bool: "boolean", int: "integer", float: "number", str: "string"}


@dataclass(frozen=True)
class Rule:
    """What one field accepts, read from its msgspec annotation."""

    doc: str
    kinds: str  # "integer or unset"
    nullable: bool
    choices: tuple[Any, ...] = ()
    lo: float | None = None
    hi: float | None = None
    below: bool = False  # `hi` itself is refused
    pattern: str | None = None
    min_length: int | None = None
    item: Rule | None = None
    struct: type | None = None


def rule_of(kind: mi.Type, annotation: Any = None) -> Rule:
    """The rule of a field's msgspec type; `annotation` (the field's own) keeps a Literal's order."""
    doc, extra = "", {}
    if isinstance(kind, mi.Metadata):
        doc = (kind.extra_json_schema or {}).get("description", "")
        extra, kind = kind.extra or {}, kind.type
    nullable = isinstance(kind, mi.UnionType) and any(isinstance(t, mi.NoneType) for t in kind.types)
    if isinstance(kind, mi.UnionType):
        kind = next(t for t in kind.types if not isinstance(t, mi.NoneType))
    if isinstance(kind, mi.Metadata):
        extra, kind = {**extra, **(kind.extra or {})}, kind.type
    if isinstance(kind, mi.LiteralType):
        words = " or ".join(dict.fromkeys(_VALUE_KIND[type(v)] for v in kind.values))
        return Rule(doc, words + (" or unset" if nullable else ""), nullable,
                    choices=_literal_args(annotation) or tuple(kind.values))
    words = _KIND[type(kind)] + (" or unset" if nullable else "")
    lo = getattr(kind, "ge", None)
    hi = getattr(kind, "le", None) if "le" not in extra else extra["le"]  # bounds past int64 live in `extra`
    below = hi is None and getattr(kind, "lt", None) is not None
    return Rule(doc, words, nullable, lo=lo, hi=getattr(kind, "lt", None) if below else hi, below=below,
                pattern=getattr(kind, "pattern", None), min_length=getattr(kind, "min_length", None),
                item=rule_of(kind.item_type) if isinstance(kind, mi.ListType) else None,
                struct=kind.cls if isinstance(kind, mi.StructType) else None)


def _literal_args(annotation: Any) -> tuple[Any, ...]:
    """A Literal's values in the order written (msgspec sorts them), through Annotated and `| None`."""
    while annotation is not None and get_origin(annotation) is not Literal:
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if args else None
    return get_args(annotation) if annotation is not None else ()


def fields(cls: type) -> dict[str, tuple[mi.Field, Rule]]:
    """Every field of the Struct `cls` with its rule, in declaration order."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    hints = get_type_hints(cls, include_extras=True)
    return {f.name: (f, rule_of(f.type, hints[f.name])) for f in info.fields}


def _bounds(rule: Rule) -> str:
    if rule.below:
        return f"at least {rule.lo} and below {rule.hi}"
    return f"{rule.lo if rule.lo is not None else '-inf'}..{rule.hi if rule.hi is not None else 'inf'}"


_MESSAGE = re.compile(r"^(?P<what>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.S)


def explain(exc: msgspec.ValidationError, data: Any, root: type) -> str:
    """msgspec's error about `data` (decoded as `root`) as one line naming the key, the value and the rule."""
    found = _MESSAGE.match(str(exc))
    assert found is not None
    what = found.group("what")
    path = found.group("path") or ""
    steps: list[str | int] = [int(i) if i else k for k, i in re.findall(r"\.(\w+)|\[(\d+)\]", path)]
    name = ".".join(s for s in steps if isinstance(s, str))
    value: Any = data
    rule = Rule("", "table", False, struct=root)
    for step in steps:
        value = value[step]
        rule = rule.item if isinstance(step, int) else fields(rule.struct)[step][1]  # type: ignore[arg-type,assignment]
    if found.group("key"):  # a table's key, which msgspec does not show
        bad = next((k for k in value if not isinstance(k, str)), None)
        return f"{name} key {bad!r} is not a string"
    unknown = re.match(r"Object contains unknown field `(\w+)`", what)
    if unknown:
        if not name:
            return f"unknown table [{unknown.group(1)}]; allowed tables: [model], [driver]"
        return f"unknown key {name}.{unknown.group(1)}; allowed keys: {', '.join(sorted(fields(rule.struct)))}"
    missing = re.match(r"Object missing required field `(\w+)`", what)
    while missing:  # a missing table: name the first key it must hold
        name = f"{name}.{missing.group(1)}".lstrip(".")
        rule = fields(rule.struct)[missing.group(1)][1]  # type: ignore[arg-type]
        required = [k for k, (f, _) in fields(rule.struct).items() if f.required] if rule.struct else []
        missing = re.match(r"(\w+)", required[0]) if required else None
    if what.startswith(("Object missing", "Expected `str` of length")):
        return f"{name} is required: {rule.doc[:1].lower()}{rule.doc[1:].rstrip('.')}"
    if steps and isinstance(steps[-1], int):  # one entry of a list
        return f"{name} entry {value!r} is not allowed; expected {PATTERN_WORDS.get(rule.pattern or '', rule.kinds)}"
    if value is None:
        return f"{name} = null is not allowed; expected {rule.kinds}"
    if what.startswith("Expected `object`") and rule.struct is not None:
        return f"[{name}] must be a table, got {type(value).__name__}"
    if what.startswith("Invalid enum value"):
        return f"{name} = {value!r} is not allowed; expected one of {', '.join(repr(c) for c in rule.choices)}"
    if what.startswith("Expected `array` of length"):
        words = PATTERN_WORDS.get(rule.item.pattern or "", "an entry") if rule.item else "an entry"
        return f"{name} = [] is empty; list at least one of {words}"
    if re.match(r"Expected `[^`]+`, got `[^`]+`", what):
        return f"{name} = {value!r} has type {type(value).__name__}; expected {rule.kinds}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} = {value!r} is not a finite number"
    if rule.below and value == rule.hi:  # the one value a reader of "0.01 to 1.0" would try
        return f"{name} = {value!r} must be smaller than {rule.hi}"
    if re.match(r"Expected `\w+` [<>]", what):
        return f"{name} = {value!r} is out of range; expected {_bounds(rule)}"
    return f"{name or 'the document'}: {what}"  # msgspec's own words: still one line


def toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def allowed(rule: Rule) -> str:
    """The rule beyond the type, as the table shows it."""
    if rule.choices:
        return ", ".join(f"`{toml(c)}`" for c in rule.choices)
    if rule.item is not None and rule.item.pattern in PATTERN_WORDS:
        return f"at least one; each {PATTERN_WORDS[rule.item.pattern]}"
    if rule.min_length:
        return "not empty"
    lo, hi = rule.lo, rule.hi
    if rule.below:
        return f"{lo:g} to below {hi:g}" if lo is not None else f"below {hi:g}"
    if lo is not None and hi is not None:
        return f"{lo:g} to {hi:g}"
    if lo is not None:
        return f"at least {lo:g}"
    return f"at most {hi:g}" if hi is not None else ""


def table_rows(cls: type, section: str) -> list[str]:
    """One markdown row per field of `cls`: key, default, type, allowed values and meaning."""
    rows = []
    for name, (f, rule) in fields(cls).items():
        if f.required:
            shown = "required"
        else:
            default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            shown = f"`{'unset' if default is None else toml(default)}`"
        rows.append(f"| `{section}.{name}` | {shown} | {rule.kinds} | {allowed(rule)} | {rule.doc} |")
    return rows
