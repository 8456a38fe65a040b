"""Settings declared once: a config dataclass's fields carry their flag, help, bounds, choices
and environment variable, and the argparse parser, the range checks and the config object
are all made from that one declaration (`uda-serve`'s ServeConfig, `uda-train`'s TrainConfig).

    port: int = setting(8000, "TCP port to listen on", ge=0, le=65535, env="UDA_PORT")

Plain dataclasses and argparse, not pydantic: `--help` must not pay for importing more than
it prints (tests/ops/test_cli_startup.py), the configs accept what tests and scripts pass them
(a str where a Path is declared) without coercion, and a range problem is one line naming the
flag, the value and the bound, every problem reported at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_KEY = "setting"


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one config field is given on the command line and what values it accepts."""

    help: str | None = None  # the --help line (argparse %-formatting, e.g. %(default)s)
    flag: str | None = None  # None: "--" + the field name in kebab-case
    type: Callable[[str], Any] | None = None  # argparse's type (int, float, Path)
    choices: tuple[Any, ...] | None = None  # closed choices, checked by argparse and the config
    action: Any = None  # "store_true" or argparse.BooleanOptionalAction
    nargs: int | None = None
    metavar: str | tuple[str, ...] | None = None
    group: str | None = None  # key of the parser's argument group (see add_arguments)
    env: str | None = None  # environment variable read when the flag is not given
    convert: Callable[[Any], Any] | None = None  # parsed text -> config value; ValueError: a problem
    cli_default: Any = None  # what the parser holds when the config default is not text (sizes)
    ge: float | None = None  # bounds, checked by range_problems and named in its message
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    integer: bool = False  # a bounded value must be an int (not a bool, not 2.0)
    finite: bool = False  # a bounded value must be a finite number
    special: tuple[Any, ...] = ()  # values allowed outside the bounds, e.g. 0 meaning auto
    special_help: str = ""  # what `special` means, e.g. "0 (auto)"
    unit: str = ""  # appended to the bounds in a message, e.g. "seconds"
    min_len: int | None = None  # a string shorter than this (or blank) is a problem
    hint: str = ""  # appended to a message about this setting, e.g. "use e.g. 127.0.0.1"

    def flag_name(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    def bounds(self) -> str:
        """'an integer in [1, 4096]', 'a number in (0, 3600] seconds', '0 (auto) or ...'."""
        what = "an integer" if self.integer else "a number"
        lo = (f"[{_num(self.ge)}" if self.ge is not None else
              f"({_num(self.gt)}" if self.gt is not None else None)
        hi = (f"{_num(self.le)}]" if self.le is not None else
              f"{_num(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            text = f"{what} in {lo}, {hi}"
        elif lo:
            text = f"{what} {'>=' if self.ge is not None else '>'} {lo[1:]}"
        elif hi:
            text = f"{what} {'<=' if self.le is not None else '<'} {hi[:-1]}"
        else:
            text = what
        text = f"{self.special_help} or {text}" if self.special_help else text
        return f"{text} {self.unit}".rstrip()

    def has_bounds(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt)) or self.integer

    def accepts(self, value: Any) -> bool:
        if value in self.special:
            return True
        if self.integer and (not isinstance(value, int) or isinstance(value, bool)):
            return False
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        if self.finite and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def setting(default: Any = dataclasses.MISSING, help: str | None = None, *,
            default_factory: Callable[[], Any] | None = None, **how: Any) -> Any:
    """A dataclass field declared with its Setting (see the module docstring)."""
    meta = {_KEY: Setting(help=help, **how)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls: type) -> dict[str, tuple[dataclasses.Field, Setting]]:
    """The fields of `cls` that are settings, in declaration order."""
    return {f.name: (f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata}


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def add_arguments(parser: argparse.ArgumentParser, cls: type,
                  groups: Mapping[str, str] | None = None) -> dict[str | None, Any]:
    """One argument per setting of `cls`; settings with a `group` go into argument groups made
    in the order of `groups` (key -> title). A setting with an environment variable defaults
    to SUPPRESS, so that "not given" stays distinguishable and values_from_args reads the
    variable instead. Returns the groups by key (None: the parser), for arguments that are not settings."""
    targets: dict[str | None, Any] = {None: parser}
    for key, title in (groups or {}).items():
        targets[key] = parser.add_argument_group(title)
    settings = declared(cls).items()
    for key, target in targets.items():  # group by group, so the groups' order is the help's
        for name, (field, s) in settings:
            if s.group == key:
                _add_argument(target, name, field, s)
    return targets


def _add_argument(target: Any, name: str, field: dataclasses.Field, s: Setting) -> None:
    default = s.cli_default if s.cli_default is not None else default_of(field)
    kwargs: dict[str, Any] = {"dest": name, "help": s.help}
    if s.env:
        shown = "unset" if default is None else default
        kwargs["help"] = f"{s.help or name} (default: ${s.env}, else {shown})"
        default = argparse.SUPPRESS
    if s.action == "store_true":
        kwargs.update(action="store_true")
    else:
        kwargs.update(default=default)
        for key in ("type", "choices", "action", "nargs", "metavar"):
            if getattr(s, key) is not None:
                kwargs[key] = getattr(s, key)
    target.add_argument(s.flag_name(name), **kwargs)


def given_names(parser: argparse.ArgumentParser, argv: Iterable[str] | None) -> set[str]:
    """The destinations the command line names explicitly (a default that never appears marks
    what was not given); `parser` is changed, so pass a fresh one."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(None if argv is None else list(argv))))


def values_from_args(cls: type, args: argparse.Namespace, problems: list[str],
                     environ: Mapping[str, str] | None = None,
                     only: set[str] | None = None) -> dict[str, Any]:
    """The config values in `args` (only the names in `only` when given), each converted as
    declared, a setting not given filled from its environment variable when that is set.
    Conversion problems are appended to `problems`, one line each; the bad setting is left
    out so the config's own default stands in while the other settings are checked."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, (field, s) in declared(cls).items():
        if hasattr(args, name) and (only is None or name in only):
            raw, origin = getattr(args, name), s.flag_name(name)
        elif s.env and environ.get(s.env, "").strip():
            raw, origin = environ[s.env].strip(), f"${s.env}"
            if s.type is not None:
                try:
                    raw = s.type(raw)
                except ValueError:
                    problems.append(f"{origin} {raw!r} is not {_kind(s.type)}: use e.g. "
                                    f"{s.env}={default_of(field)}")
                    continue
        else:
            continue
        try:
            values[name] = s.convert(raw) if s.convert is not None and raw is not None else raw
        except ValueError as e:
            problems.append(f"{origin}: {e}")
    return values


def env_value(cls: type, name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The environment variable declared for setting `name`, stripped; None when unset or blank."""
    s = declared(cls)[name][1]
    value = (os.environ if environ is None else environ).get(s.env or "", "").strip()
    return value or None


def _kind(type_: Callable[[str], Any]) -> str:
    return {int: "an integer", float: "a number"}.get(type_, f"a valid {getattr(type_, '__name__', 'value')}")


def range_problems(config: Any) -> list[str]:
    """One line per setting of `config` outside its declared bounds, choices or length, naming
    the flag, the value and what is allowed. None passes: it means "decided later"."""
    problems = []
    for name, (_, s) in declared(type(config)).items():
        value, flag = getattr(config, name), s.flag_name(name)
        hint = f": {s.hint}" if s.hint else ""
        if value is None:
            continue
        if s.has_bounds() and not s.accepts(value):
            problems.append(f"{flag} {value!r} is out of range: expected {s.bounds()}{hint}")
        elif s.choices is not None and value not in s.choices:
            problems.append(f"{flag} {value!r} is not one of {', '.join(map(str, s.choices))}")
        elif s.min_len is not None and len(str(value).strip()) < s.min_len:
            what = "is empty" if s.min_len == 1 else f"must have at least {s.min_len} characters"
            problems.append(f"{flag} {what}{hint}")
    return problems

