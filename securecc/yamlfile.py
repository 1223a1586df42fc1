"""One strict YAML loader for acl.yaml and the server config: every error names its file and line.

``yaml.safe_load`` forgets where each value came from and keeps the last of
two equal keys without a word: in an ACL, a second ``deny:`` would replace
the first.  :func:`load` parses with a SafeLoader subclass (no python tags,
so no objects) whose mappings and lists remember their lines, refuses
duplicate and merge keys, and turns every failure, a syntax error or a
``2001-13-45`` alike, into one :class:`YamlError`: ``FILE:LINE: sentence``.

The ``get_*`` helpers are the checks both files make on a value (its type,
bool never counting as a number), :func:`refuse_unknown` the one on keys, so
a typo is an error rather than a setting silently left out.  Validation
beyond that (which realms, which paths) stays with each file, raising
:meth:`YamlMapping.error`.  A leaf: stdlib and PyYAML only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Hashable
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode


class YamlError(Exception):
    """A file that is not YAML, or not what it should hold: ``FILE:LINE: message``, for the user as it is."""

    def __init__(self, where: str, line: int, message: str) -> None:
        super().__init__(f"{where}:{line}: {message}")
        self.where, self.line, self.message = where, line, message


class YamlMapping(dict[Any, Any]):
    """A YAML mapping that knows its file, its line and the line of each key (lines count from 1)."""

    def __init__(self, where: str, line: int) -> None:
        super().__init__()
        self.where, self.line = where, line
        self.lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        """The line of ``key``; of the mapping itself if ``key`` is None or absent."""
        return self.lines.get(key, self.line) if key is not None else self.line

    def error(self, key: Any, message: str) -> YamlError:
        return YamlError(self.where, self.line_of(key), message)


class YamlList(list[Any]):
    """A YAML sequence that knows its file, its line and the line of each item."""

    def __init__(self, where: str, line: int) -> None:
        super().__init__()
        self.where, self.line = where, line
        self.lines: list[int] = []

    def error(self, index: int, message: str) -> YamlError:
        return YamlError(self.where, self.lines[index], message)


class _Loader(yaml.SafeLoader):
    """SafeLoader (no python tags) that knows which file it reads, for the mappings and lists it builds."""

    def __init__(self, text: str | bytes, where: str) -> None:
        super().__init__(text)
        self.where = where

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        """PyYAML's scalar constructors fail on values such as ``2001-13-45``, ``0x_`` or ``!!int x`` with
        ValueError, KeyError, AttributeError...: each becomes a ConstructorError at the value's line."""
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception:
            if not isinstance(node, ScalarNode):
                raise
            kind = str(node.tag).rsplit(":", 1)[-1]
            raise ConstructorError(None, None, f"{node.value!r} is not a valid {kind}", node.start_mark) from None


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _kind_of(node: Node, wanted: type[Node], tag: str) -> None:
    """``!!map`` and ``!!seq`` may tag any node: the other kind must be an error, not a TypeError in the constructor."""
    if not isinstance(node, wanted):
        kinds = {ScalarNode: "a scalar", SequenceNode: "a sequence", MappingNode: "a mapping"}
        raise ConstructorError(None, None, f"!!{tag} needs {kinds[wanted]}, not {kinds.get(type(node), 'that node')}",
                               node.start_mark)


def _construct_mapping(loader: _Loader, node: MappingNode) -> YamlMapping:
    _kind_of(node, MappingNode, "map")
    mapping = YamlMapping(loader.where, _line(node))
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise ConstructorError(None, None, "merge keys (<<) are not supported: write the keys out", key_node.start_mark)
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise ConstructorError(None, None, "a key must be a single value, not a list or a mapping", key_node.start_mark)
        if key in mapping:
            raise ConstructorError(None, None, f"'{key}' appears twice", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = _line(key_node)
    return mapping


def _construct_list(loader: _Loader, node: SequenceNode) -> YamlList:
    _kind_of(node, SequenceNode, "seq")
    items = YamlList(loader.where, _line(node))
    for item in node.value:
        items.append(loader.construct_object(item, deep=True))
        items.lines.append(_line(item))
    return items


def _refuse_tag(loader: _Loader, node: Node) -> None:
    """!!set, !!omap and !!pairs would make collections that remember no lines; nothing here needs them."""
    raise ConstructorError(None, None, f"!!{str(node.tag).rsplit(':', 1)[-1]} is not supported here", node.start_mark)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_list)
for _tag in ("set", "omap", "pairs"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)


def load(text: str | bytes, where: str, expected: str = "a mapping at the top level") -> YamlMapping:
    """Parse one YAML document, which must be a mapping (an empty file is not: "expected EXPECTED").

    ``where`` names the file in errors; bytes are decoded as YAML does (UTF-8, or UTF-16 with a BOM).
    """
    try:
        loader = _Loader(text, where)  # the reader checks the text's encoding and characters already
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:  # "while parsing a flow sequence, expected ',' or ']', but got '<stream end>'"
        mark = e.problem_mark or e.context_mark
        message = ", ".join(part for part in (e.context, e.problem) if part) or "not valid YAML"
        raise YamlError(where, mark.line + 1 if mark else 1, message) from None
    except yaml.reader.ReaderError as e:  # not UTF-8, or a control character: a position, no mark
        before = text[: e.position]
        line = (before.count("\n") if isinstance(before, str) else before.count(b"\n")) + 1
        message = str(e).splitlines()[0] if e.encoding == "unicode" else f"not {e.encoding.upper()} text ({e.reason})"
        raise YamlError(where, line, message) from None
    except yaml.YAMLError as e:
        raise YamlError(where, 1, str(e).splitlines()[0]) from None
    except RecursionError:
        raise YamlError(where, 1, "nested too deeply") from None
    if not isinstance(data, YamlMapping):
        raise YamlError(where, data.line if isinstance(data, YamlList) else 1, f"expected {expected}")
    return data


def refuse_unknown(mapping: YamlMapping, known: Collection[str], within: str = "", prefix: str = "") -> None:
    """Refuse the first key not in ``known``, quoted as ``{prefix}{key}`` (``prefix="ldap."``), found ``within`` what."""
    for key in mapping:
        if key not in known:
            place = f" in {within}" if within else ""
            raise mapping.error(key, f"unknown key '{prefix}{key}'{place} (known: {', '.join(sorted(known))})")


# The getters: ``mapping[key]``, or ``default`` when the key is absent (no default: the key is required),
# if it has the type asked for, else a YamlError at its line.  ``name`` is what the message calls the key
# (``ldap.timeout``; the key itself by default); where a getter takes ``message``, it replaces the message.


def _get(mapping: YamlMapping, key: str, default: Any, fits: Callable[[Any], bool], name: str | None, message: str | None = None) -> Any:
    value = mapping.get(key, default)
    if not fits(value):
        raise mapping.error(key, message or f"'{name or key}' has the wrong type ({_type_name(value)})")
    return value


def _type_name(value: Any) -> str:
    """What YAML made of a value, in Python's words: ``str``, ``int``, ``list``, ``dict``, ``NoneType``."""
    return "list" if isinstance(value, YamlList) else "dict" if isinstance(value, YamlMapping) else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int to Python: true is not 1 here


def _no_nul(mapping: YamlMapping, key: str, value: str, name: str | None) -> str:
    if "\0" in value:  # YAML writes one as "\0"; no path, principal or filter holds one, and os calls refuse it
        raise mapping.error(key, f"'{name or key}' contains a NUL character")
    return value


def get_str(mapping: YamlMapping, key: str, default: str | None = None, *, name: str | None = None) -> str:
    """A string, maybe empty, without NULs."""
    return _no_nul(mapping, key, _get(mapping, key, default, lambda v: isinstance(v, str), name), name)


def get_bool(mapping: YamlMapping, key: str, default: bool | None = None, *, name: str | None = None) -> bool:
    value: bool = _get(mapping, key, default, lambda v: isinstance(v, bool), name)
    return value


def get_int(mapping: YamlMapping, key: str, default: int | None = None, *, name: str | None = None) -> int:
    value: int = _get(mapping, key, default, _is_int, name)
    return value


def get_positive_int(mapping: YamlMapping, key: str, default: int | None = None, *, name: str | None = None) -> int:
    value: int = _get(mapping, key, default, lambda v: _is_int(v) and v > 0, name, f"'{name or key}' must be a positive whole number")
    return value


def get_seconds(mapping: YamlMapping, key: str, default: float | None = None, *, name: str | None = None) -> float:
    """A duration: a whole or a decimal number of seconds, finite and not negative (``.nan`` and ``.inf`` are
    floats to YAML; an int too large for a float is refused, not an OverflowError)."""
    value = float(_get(mapping, key, default, lambda v: isinstance(v, float) or (_is_int(v) and abs(v) < 1e308), name))
    if not 0 <= value < math.inf:
        raise mapping.error(key, f"'{name or key}' must be a number of seconds, 0 or more")
    return value


def get_names(mapping: YamlMapping, key: str, default: list[str] | None = None, *, at_least_one: bool = False,
              name: str | None = None, message: str | None = None) -> list[str]:
    """A list of non-empty strings (principals, groups, compilers, URIs); the error is at the bad item's line."""
    message = message or f"'{name or key}' must be a list of names"
    value: list[str] = _get(mapping, key, default, lambda v: isinstance(v, list) and (bool(v) or not at_least_one), name, message)
    for index, item in enumerate(value):
        if not (isinstance(item, str) and item and "\0" not in item):
            raise value.error(index, message) if isinstance(value, YamlList) else mapping.error(key, message)
    return value


def get_mapping(mapping: YamlMapping, key: str, *, name: str | None = None, message: str | None = None) -> YamlMapping:
    """A nested mapping; absent or null (``key:`` and nothing else) is an empty one, at the key's line."""
    if mapping.get(key) is None:
        return YamlMapping(mapping.where, mapping.line_of(key))
    section: YamlMapping = _get(mapping, key, None, lambda v: isinstance(v, YamlMapping), name, message)
    return section
