"""Command-line flags and the docs table, derived from dataclass field metadata.

A field documents itself once::

    open_ksize: int = field(default=0, metadata={
        "help": "side of the square opening (0 = off, else odd >= 3)",
        "flag": "--defect-open-ksize",          # optional: default "--open-ksize"
        "aliases": ("--open-ksize",),           # optional
        "choices": (4, 8),                      # optional
        "group": "settings",                    # optional: argparse group title
        "cli": False,                           # optional: no flag
        "nargs": 2, "metavar": ("H", "W"),      # optional, as argparse takes them
    })

The flag's type, ``nargs`` and boolean form come from the annotation: ``bool`` gives
``--flag/--no-flag``, ``Optional[X]`` accepts ``none``, ``Tuple[int, int]`` and
``List[float]`` take several values. Every flag uses ``argparse.SUPPRESS`` so only what the
user typed reaches the library, whose defaults stay the single source of truth.
"""

import argparse
import dataclasses
import typing
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["FieldFlag", "add_flags", "field_flags", "flags_table", "user_values"]


class FieldFlag(typing.NamedTuple):
    """One dataclass field as a command-line flag."""

    name: str
    flag: str
    aliases: Tuple[str, ...]
    help: str
    group: Optional[str]
    default: Any
    kwargs: Dict[str, Any]


class _StoreTuple(argparse.Action):
    """Stores a fixed number of values as a tuple (the field's type), not a list."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, tuple(values))


def _metadata(cls: type, f: dataclasses.Field) -> Dict[str, Any]:
    return dict(f.metadata)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text.lower() == "none":
            return None
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _argparse_kwargs(hint: Any, meta: Dict[str, Any]) -> Dict[str, Any]:
    optional = False
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else str
        origin = typing.get_origin(hint)
    kw: Dict[str, Any] = {}
    if hint is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin in (tuple, list, typing.Tuple, typing.List):
        args = typing.get_args(hint)
        elem = args[0] if args else str
        kw["type"] = elem if elem in (int, float) else str
        if origin in (tuple, typing.Tuple) and args and args[-1] is not Ellipsis:
            kw["nargs"] = len(args)
            kw["action"] = _StoreTuple
        else:
            kw["nargs"] = "+"
    elif hint in (int, float, str):
        kw["type"] = _none_or(hint) if optional and hint is not str else hint
    else:
        kw["type"] = str
    for key in ("choices", "nargs", "metavar", "type", "action", "const", "required"):
        if key in meta:
            kw[key] = meta[key]
    if isinstance(kw.get("metavar"), tuple) and "nargs" not in meta:
        kw["nargs"] = len(kw["metavar"])  # a value per name: roi X1 Y1 X2 Y2
    return kw


def field_flags(cls: type) -> List[FieldFlag]:
    """The flags of ``cls``'s fields (those without ``"cli": False``), in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        meta = _metadata(cls, f)
        if meta.get("cli", True) is False:
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        help_text = meta.get("help", f"{cls.__name__}.{f.name}")
        kw = _argparse_kwargs(hints[f.name], meta)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            kw["required"] = True
        out.append(
            FieldFlag(
                f.name,
                flag,
                tuple(meta.get("aliases", ())),
                help_text,
                meta.get("group"),
                _default_of(f),
                kw,
            )
        )
    return out


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    groups: Optional[Dict[str, Any]] = None,
    default_group: Any = None,
    skip: Iterable[str] = (),
) -> List[str]:
    """Add one flag per field of ``cls`` to ``parser``; return the field names added.

    Args:
        parser: the (sub)parser; flags use ``argparse.SUPPRESS`` defaults.
        cls: a dataclass whose fields carry metadata (module docstring).
        groups: argument groups by title, filled as fields name new ones.
        default_group: where a field without ``"group"`` goes (default: ``parser``).
        skip: field names or flags to leave out (already added from another class).
    """
    groups = {} if groups is None else groups
    names = []
    skip = set(skip)
    for ff in field_flags(cls):
        if ff.name in skip or ff.flag in skip:
            continue
        target = default_group if default_group is not None else parser
        if ff.group is not None:
            if ff.group not in groups:
                groups[ff.group] = parser.add_argument_group(ff.group)
            target = groups[ff.group]
        shown = "" if ff.default in (None, False, [], ()) else f" (default {ff.default})"
        target.add_argument(
            ff.flag,
            *ff.aliases,
            dest=ff.name,
            default=argparse.SUPPRESS,
            help=ff.help + shown,
            **ff.kwargs,
        )
        names.append(ff.name)
    return names


def user_values(args: argparse.Namespace, names: Iterable[str]) -> Dict[str, Any]:
    """The fields among ``names`` the user set (argparse.SUPPRESS leaves the rest out)."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def flags_table(classes: Sequence[type]) -> str:
    """A Markdown table of the flags of ``classes``; a field name already given by an
    earlier class is left out, as :func:`add_flags` is told to (docs/cli.md is checked
    against it; ``python -m torchdefects._fields`` prints the ``run`` table)."""
    rows = ["| flag | aliases | default | help |", "| --- | --- | --- | --- |"]
    seen: set = set()
    for cls in classes:
        for ff in field_flags(cls):
            if ff.name in seen:
                continue
            seen.add(ff.name)
            aliases = ", ".join(f"`{a}`" for a in ff.aliases)
            default = "" if ff.default is None else f"`{ff.default}`"
            rows.append(f"| `{ff.flag}` | {aliases} | {default} | {ff.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    from torchdefects.batch.options import RunOptions
    from torchdefects.config import DefectsConfig

    print(flags_table([RunOptions, DefectsConfig]), end="")
