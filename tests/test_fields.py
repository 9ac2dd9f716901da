"""torchdefects._fields: flags from dataclass field metadata."""

import argparse
import dataclasses
from typing import List, Optional, Tuple

import pytest

from torchdefects._fields import add_flags, field_flags, flags_table, user_values


@dataclasses.dataclass
class _Opts:
    name: str = dataclasses.field(metadata={"help": "a name"})
    size: Optional[Tuple[int, int]] = dataclasses.field(default=None, metadata={"help": "H W"})
    values: Optional[List[float]] = dataclasses.field(default=None, metadata={"help": "v"})
    limit: Optional[int] = dataclasses.field(
        default=None, metadata={"help": "n or none", "flag": "--max-n", "aliases": ("--n",)}
    )
    on: bool = dataclasses.field(default=False, metadata={"help": "switch", "group": "g"})
    mode: str = dataclasses.field(default="a", metadata={"help": "m", "choices": ("a", "b")})
    hidden: int = dataclasses.field(default=0, metadata={"cli": False})
    plain: int = 3  # no metadata: a flag with fallback help


def _parse(argv):
    p = argparse.ArgumentParser()
    names = add_flags(p, _Opts)
    return user_values(p.parse_args(argv), names), names


def test_only_set_flags_are_forwarded_and_typed():
    got, names = _parse(["--name", "x", "--size", "2", "3", "--n", "none", "--no-on"])
    assert got == {"name": "x", "size": (2, 3), "limit": None, "on": False}
    assert "hidden" not in names and "plain" in names
    got, _ = _parse(["--name", "x", "--max-n", "7", "--values", "1", "2.5", "--on", "--plain", "4"])
    assert got == {"name": "x", "limit": 7, "values": [1.0, 2.5], "on": True, "plain": 4}
    assert _Opts(**got).limit == 7


@pytest.mark.parametrize(
    "argv", [[], ["--name", "x", "--mode", "c"], ["--name", "x", "--size", "1"]]
)
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2


def test_table_lists_each_flag_once():
    ff = {f.name: f for f in field_flags(_Opts)}
    assert ff["limit"].flag == "--max-n" and ff["limit"].aliases == ("--n",)
    assert ff["plain"].help == "_Opts.plain"
    table = flags_table([_Opts, _Opts])
    assert table.count("`--max-n`") == 1 and "`--hidden`" not in table
