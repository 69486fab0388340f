"""Settings written once: each field of a settings dataclass (`BuildConfig`, `TrainConfig`) carries its default,
type and help, and the command line is made from the fields. No default is restated in a CLI.

    k: int = setting(8, "topk: candidates per position; mc: samples.")
    lam: float = setting(0.5, "λ in (1-λ)·MDM + λ·KD.", flag="--lambda")

`cli_signature(cls)` turns the fields that carry help into typer parameters; fields without help are settings
of the API only.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable, Literal, Optional

from ar2mdm.shared.errors import UserError


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    argument: bool = False,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field with its command-line help (and flag, where it is not ``--field-name``), and the range its
    value must lie in (checked by `check_settings`; None, where a field allows it, is never out of range)."""
    meta = {"help": help, "flag": flag, "argument": argument, "range": (at_least, above, at_most, below)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def words_of(tp: Any) -> tuple | None:
    """The words a number field also takes: ``int | Literal["auto"]`` -> ("auto",); None for any other type."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(tp)
    words = [a for a in args if typing.get_origin(a) is Literal]
    if int not in args or len(words) != 1:
        return None
    return typing.get_args(words[0])


def parse_number_or_word(text: str) -> int | str:
    """``--batch-size 16`` -> 16; any other text stays text, for `check_settings` to accept (``auto``) or refuse
    in the command line's words."""
    try:
        return int(text)
    except ValueError:
        return text


def _cli_type(tp: Any) -> Any:
    """The type typer parses: Literal -> str, X | None -> Optional[X], dict -> repeated KEY=VALUE strings,
    int | Literal[words] -> str (parsed by `parse_number_or_word`)."""
    if words_of(tp):
        return str
    origin = typing.get_origin(tp)
    if origin is Literal:
        return type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return Optional[_cli_type(args[0])]
    if origin is dict or tp is dict:
        return list[str]
    return tp


def cli_signature(cls: type, defaults: dict[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: give a typer command one keyword parameter per field of ``cls`` that has help, with that
    field's type, default and help. ``defaults`` replaces a field's default on the command line only (e.g.
    None where the command fills the value in from elsewhere)."""
    import typer  # only where a command line is made: the settings themselves need no CLI library

    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        default = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if defaults and f.name in defaults:
            default = defaults[f.name]
        if isinstance(default, dict):
            default = [f"{k}={v}" for k, v in default.items()]
        ann = _cli_type(hints[f.name])
        if defaults and f.name in defaults and defaults[f.name] is None:
            ann = Optional[ann] if typing.get_origin(ann) is not typing.Union else ann
        extra = {}
        if words := words_of(hints[f.name]):  # typer parses no unions: the value comes as text
            extra = dict(
                parser=parse_number_or_word,
                metavar="|".join(["INTEGER", *(w.upper() for w in words)]),
            )
            default = str(default)
        if meta["argument"]:
            info = typer.Argument(... if default is dataclasses.MISSING else default, help=meta["help"])
        else:
            info = typer.Option(default, *([meta["flag"]] if meta["flag"] else []), help=meta["help"], **extra)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=ann))

    params.sort(key=lambda p: not isinstance(p.default, typer.models.ArgumentInfo))  # arguments first, as typed

    def wrap(fn: Callable) -> Callable:
        fn.__signature__ = inspect.Signature(params)
        fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return fn

    return wrap


def flag_of(cls: type, name: str) -> str:
    """A field's name as the command line spells it, with underscores (``lam`` -> ``lambda``, ``batch_size``):
    sweep keys, point names and result columns use it."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.metadata.get("flag"):
            return f.metadata["flag"].split("/")[0].lstrip("-").replace("-", "_")
    return name


def field_of(cls: type, key: str) -> str:
    """The field a key names: its command-line spelling or the field's own (``lambda``, ``lam``; dashes or
    underscores)."""
    key = key.strip().lstrip("-").replace("-", "_")
    for f in dataclasses.fields(cls):
        if key in (f.name, flag_of(cls, f.name)):
            return f.name
    return key


def _choices(tp: Any) -> tuple | None:
    """A Literal type's values (None for any other type)."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _range_text(at_least, above, at_most, below) -> str:
    """'at least 1', '> 0', 'in [0, 1]', 'in (0, 1)'."""
    lo, hi = (at_least if at_least is not None else above), (at_most if at_most is not None else below)
    if hi is None:
        return f"at least {lo}" if at_least is not None else f"> {lo}"
    return f"in {'[' if at_least is not None else '('}{lo}, {hi}{']' if at_most is not None else ')'}"


def check_settings(settings: Any) -> None:
    """Refuse a value outside its field's choices (Literal) or range (`setting(at_least=...)`), in the command
    line's words: ``--mode must be one of topk, mc, fim, got 'x'``, ``--k must be at least 1, got 0``. Every mode
    and every range of a settings dataclass is checked here, once."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        flag = (f.metadata.get("flag") or f"--{f.name.replace('_', '-')}").split("/")[0]
        choices = _choices(hints[f.name])
        if choices is not None and value not in choices:
            raise UserError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
        words = words_of(hints[f.name])
        if words and not isinstance(value, int) and value not in words:
            raise UserError(f"{flag} must be a whole number or {' | '.join(words)}, got {value!r}")
        at_least, above, at_most, below = f.metadata.get("range", (None,) * 4)
        if value is None or value in (words or ()) or (at_least, above, at_most, below) == (None,) * 4:
            continue
        if (
            (at_least is not None and value < at_least)
            or (above is not None and value <= above)
            or (at_most is not None and value > at_most)
            or (below is not None and value >= below)
        ):
            raise UserError(f"{flag} must be {_range_text(at_least, above, at_most, below)}, got {value}")
