"""securecc.yamlfile: the one strict loader of acl.yaml and the server config, its lines and its checks.

The contract: :func:`load` returns mappings and lists that know the line of every key and item,
or raises :class:`YamlError` (``FILE:LINE: sentence``); never another exception, whatever the text.
"""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from securecc.yamlfile import (
    YamlError,
    YamlList,
    YamlMapping,
    get_bool,
    get_int,
    get_mapping,
    get_names,
    get_positive_int,
    get_seconds,
    get_str,
    load,
    refuse_unknown,
)

PROPERTY = settings(max_examples=150, deadline=None, database=None, print_blob=True)  # a fraction of a second each


def error(text: str | bytes) -> str:
    """The message ``load`` refuses ``text`` with, file name and line included."""
    with pytest.raises(YamlError) as caught:
        load(text, "f.yaml")
    return str(caught.value)


# --- the loader ------------------------------------------------------------------------------


def test_mappings_and_lists_remember_their_lines():
    data = load("# a comment\ntop: 1\nsection:\n  key: 2\n  items:\n    - a\n\n    - b\n    - {deep: 3}\n", "f.yaml")
    assert data == {"top": 1, "section": {"key": 2, "items": ["a", "b", {"deep": 3}]}}
    assert (data.where, data.line, data.lines) == ("f.yaml", 2, {"top": 2, "section": 3})
    section = data["section"]
    assert isinstance(section, YamlMapping) and section.line == 4 and section.lines == {"key": 4, "items": 5}
    items = section["items"]
    assert isinstance(items, YamlList) and items.lines == [6, 8, 9] and items[2].lines == {"deep": 9}
    assert str(items.error(1, "no")) == "f.yaml:8: no" and str(section.error("items", "no")) == "f.yaml:5: no"
    assert section.line_of("absent") == 4 and section.line_of(None) == 4


def test_flow_collections_and_aliases():
    data = load("a: {b: [1, 2]}\nc:\n  [x,\n   y]\nd: &anchor {e: 1}\nf: *anchor\n", "f.yaml")
    assert data["a"].line == 1 and data["a"]["b"].lines == [1, 1] and data["c"].lines == [3, 4]
    assert data["f"] is data["d"] and data["f"].line == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: 2\na: 3\n", "f.yaml:3: 'a' appears twice"),
        ("a:\n  b: 1\n  b: 2\n", "f.yaml:3: 'b' appears twice"),
        ("a:\n  - x: 1\n    x: 2\n", "f.yaml:3: 'x' appears twice"),
        ("{a: 1, a: 1}", "f.yaml:1: 'a' appears twice"),
        ("1: a\n1: b\n", "f.yaml:2: '1' appears twice"),
    ],
)
def test_duplicate_keys_are_refused_at_the_second(text, message):
    """safe_load keeps the last of two equal keys without a word: a second deny: would replace the first."""
    assert error(text) == message


@pytest.mark.parametrize(
    "text",
    [
        "a: !!python/object:os.system {}\n",
        "a: !!python/object/apply:os.system [echo hi]\n",
        "a: !!python/name:os.system\n",
        "a: !!python/tuple [1, 2]\n",
        "a: !!python/bytes aGk=\n",
    ],
)
def test_python_tags_are_refused(text):
    assert error(text).startswith("f.yaml:1: could not determine a constructor for the tag 'tag:yaml.org,2002:python/")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: &b {x: 1}\nother:\n  <<: *b\n", "f.yaml:3: merge keys (<<) are not supported: write the keys out"),
        ("a: !!set {x, y}\n", "f.yaml:1: !!set is not supported here"),
        ("a:\n  !!omap [x: 1]\n", "f.yaml:2: !!omap is not supported here"),
        ("? [a, b]\n: c\n", "f.yaml:1: a key must be a single value, not a list or a mapping"),
        ("a: &x [*x]\n", "f.yaml:1: found unconstructable recursive node"),
    ],
)
def test_keys_and_tags_that_would_hide_lines_or_values(text, message):
    assert error(text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: [2\n", "f.yaml:3: while parsing a flow sequence, expected ',' or ']', but got '<stream end>'"),
        ("a: 1\n\tb: 2\n", "f.yaml:2: while scanning for the next token, found character '\\t' that cannot start any token"),
        ("a: 1\nb: c: d\n", "f.yaml:2: mapping values are not allowed here"),
        ("a: 1\n---\nb: 2\n", "f.yaml:2: expected a single document in the stream, but found another document"),
        ("a: *nowhere\n", "f.yaml:1: found undefined alias 'nowhere'"),
    ],
)
def test_syntax_errors_name_their_line(text, message):
    assert error(text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: 2001-13-45\n", "f.yaml:2: '2001-13-45' is not a valid timestamp"),
        ("a: 0x_\n", "f.yaml:1: '0x_' is not a valid int"),
        ("a:\n  - !!int x\n", "f.yaml:2: 'x' is not a valid int"),
        ("a: !!bool maybe\n", "f.yaml:1: 'maybe' is not a valid bool"),
        ("a: !!timestamp soon\n", "f.yaml:1: 'soon' is not a valid timestamp"),
        ("a: !!float\n", "f.yaml:1: '' is not a valid float"),
    ],
)
def test_values_pyyaml_cannot_construct_are_errors_not_exceptions(text, message):
    """PyYAML raises ValueError, KeyError or AttributeError on these: a traceback for the user."""
    assert error(text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: !!map [c, d]\n", "f.yaml:2: !!map needs a mapping, not a sequence"),
        ("a: !!map [[c, d]]\n", "f.yaml:1: !!map needs a mapping, not a sequence"),
        ("!!map [a]\n", "f.yaml:1: !!map needs a mapping, not a sequence"),
        ("a:\n  - !!seq {b: 1}\n", "f.yaml:2: !!seq needs a sequence, not a mapping"),
        ("a: !!seq b\n", "f.yaml:1: !!seq needs a sequence, not a scalar"),
        ("a: !!map b\n", "f.yaml:1: !!map needs a mapping, not a scalar"),
    ],
)
def test_a_collection_tag_on_the_other_kind_of_node_is_an_error(text, message):
    """``!!map`` on a sequence, ``!!seq`` on a mapping: PyYAML hands our constructors the wrong kind of node,
    which raised TypeError or AttributeError (an acl.yaml edit so tagged broke every job's ACL check)."""
    assert error(text) == message


def test_empty_and_non_mapping_documents():
    assert error("") == "f.yaml:1: expected a mapping at the top level"
    assert error("# only a comment\n") == "f.yaml:1: expected a mapping at the top level"
    assert error("\n\n- a\n- b\n") == "f.yaml:3: expected a mapping at the top level"
    assert error("just text") == "f.yaml:1: expected a mapping at the top level"
    with pytest.raises(YamlError, match=r"^acl\.yaml:1: expected a mapping with keys a, b$"):
        load("", "acl.yaml", expected="a mapping with keys a, b")


def test_encodings_and_characters():
    assert load(b"\xef\xbb\xbfa: 1\n", "f.yaml") == {"a": 1}  # a UTF-8 byte order mark
    assert load("a: 1\n".encode("utf-16"), "f.yaml") == {"a": 1}
    assert error(b"a: 1\nb: \xff\n") == "f.yaml:2: not UTF-8 text (invalid start byte)"
    assert error("a: 1\nb: \x00\n") == "f.yaml:2: unacceptable character #x0000: special characters are not allowed"


def test_deep_nesting_is_an_error():
    assert error("a: " + "[" * 600 + "]" * 600) == "f.yaml:1: nested too deeply"


def test_error_carries_file_and_line():
    with pytest.raises(YamlError) as caught:
        load("a: 1\na: 2\n", "dir/f.yaml")
    assert (caught.value.where, caught.value.line, caught.value.message) == ("dir/f.yaml", 2, "'a' appears twice")


# --- the checks --------------------------------------------------------------------------------

CONFIG = """\
name: build1
port: 3637
enabled: true
timeout: 1.5
retries: 3
zero: 0
flag_as_int: 1
int_as_bool: true
nothing:
users:
  - alice
  - ""
  - bob
groups: [a, b]
section:
  inner: x
"""


@pytest.fixture(scope="module")
def config() -> YamlMapping:
    return load(CONFIG, "c.yaml")


def raised(call, *args, **kwargs) -> str:
    with pytest.raises(YamlError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


def test_get_typed_values(config):
    assert get_str(config, "name") == "build1" and get_int(config, "port") == 3637 and get_bool(config, "enabled") is True
    assert get_seconds(config, "timeout") == 1.5 and get_seconds(config, "retries") == 3.0
    assert isinstance(get_seconds(config, "retries"), float) and get_positive_int(config, "retries") == 3
    assert get_names(config, "groups") == ["a", "b"] and get_mapping(config, "section") == {"inner": "x"}


def test_defaults_apply_only_to_absent_keys(config):
    assert get_str(config, "absent", "x") == "x" and get_int(config, "absent", 5) == 5 and get_seconds(config, "absent", 2) == 2.0
    assert get_names(config, "absent", ["m"]) == ["m"] and get_bool(config, "absent", False) is False
    assert raised(get_int, config, "nothing", 5) == "c.yaml:9: 'nothing' has the wrong type (NoneType)"
    assert raised(get_str, config, "absent") == "c.yaml:1: 'absent' has the wrong type (NoneType)"  # no default: required


def test_wrong_types_name_the_key_and_line(config):
    assert raised(get_int, config, "name") == "c.yaml:1: 'name' has the wrong type (str)"
    assert raised(get_str, config, "port", name="server.port") == "c.yaml:2: 'server.port' has the wrong type (int)"
    assert raised(get_bool, config, "flag_as_int") == "c.yaml:7: 'flag_as_int' has the wrong type (int)"
    assert raised(get_int, config, "groups") == "c.yaml:14: 'groups' has the wrong type (list)"
    assert raised(get_seconds, config, "section") == "c.yaml:15: 'section' has the wrong type (dict)"
    assert raised(get_mapping, config, "groups") == "c.yaml:14: 'groups' has the wrong type (list)"
    assert raised(get_mapping, config, "name", message="say it my way") == "c.yaml:1: say it my way"


@pytest.mark.parametrize("getter", [get_int, get_positive_int, get_seconds])
def test_bool_is_not_a_number(config, getter):
    """Python's True is 1: ``timeout: yes`` must not become a one-second timeout."""
    with pytest.raises(YamlError, match=r"^c\.yaml:8: 'int_as_bool' "):
        getter(config, "int_as_bool")


def test_positive_int(config):
    assert raised(get_positive_int, config, "zero") == "c.yaml:6: 'zero' must be a positive whole number"
    assert raised(get_positive_int, config, "timeout") == "c.yaml:4: 'timeout' must be a positive whole number"
    assert get_int(config, "zero") == 0


def test_seconds_refuse_what_a_float_cannot_hold():
    huge = load(f"t: {10**400}\n", "c.yaml")
    assert raised(get_seconds, huge, "t") == "c.yaml:1: 't' has the wrong type (int)"


@pytest.mark.parametrize("value", ["-1", ".nan", ".inf", "-.inf"])
def test_seconds_are_finite_and_not_negative(value):
    assert raised(get_seconds, load(f"t: {value}\n", "c.yaml"), "t") == "c.yaml:1: 't' must be a number of seconds, 0 or more"


def test_a_nul_in_a_string_is_refused_at_its_line():
    document = load('path: "/etc/keytab\\0.bak"\nnames: [a, "b\\0"]\n', "c.yaml")
    assert raised(get_str, document, "path") == "c.yaml:1: 'path' contains a NUL character"
    assert raised(get_names, document, "names") == "c.yaml:2: 'names' must be a list of names"


def test_names_point_at_the_bad_item(config):
    assert raised(get_names, config, "users") == "c.yaml:12: 'users' must be a list of names"
    assert raised(get_names, config, "name") == "c.yaml:1: 'name' must be a list of names"
    empty = load("realms: []\n", "acl.yaml")
    assert get_names(empty, "realms") == []
    assert raised(get_names, empty, "realms", at_least_one=True, message="'realms' must list at least one realm") == (
        "acl.yaml:1: 'realms' must list at least one realm")


def test_mapping_absent_or_null_is_empty_at_the_key(config):
    for key, line in (("nothing", 9), ("absent", 1)):
        section = get_mapping(config, key)
        assert section == {} and isinstance(section, YamlMapping) and section.line == line
        assert str(section.error("x", "no")) == f"c.yaml:{line}: no"


def test_refuse_unknown(config):
    section = get_mapping(config, "section")
    refuse_unknown(section, {"inner", "other"})
    assert raised(refuse_unknown, section, {"other", "more"}) == "c.yaml:16: unknown key 'inner' (known: more, other)"
    assert raised(refuse_unknown, section, {"x"}, prefix="section.") == "c.yaml:16: unknown key 'section.inner' (known: x)"
    assert raised(refuse_unknown, section, {"x"}, within="an allow rule") == (
        "c.yaml:16: unknown key 'inner' in an allow rule (known: x)")


# --- properties -------------------------------------------------------------------------------

YAMLISH = st.lists(st.sampled_from(["a", "b", ":", " ", "\n", "  ", "- ", "[", "]", "{", "}", ",", "?", "&x", "*x", "!!", "!!python/",
                                    "str", "int", "set", "<<", "'", '"', "\\", "#", "---", "|", ">", "1", "0x", "2001-13-45", "\t",
                                    "~", "null", "true", "%YAML 1.1\n", "!x"]), max_size=40).map("".join)


@PROPERTY
@given(st.one_of(st.text(max_size=200), YAMLISH, st.binary(max_size=100)))
def test_any_text_loads_or_is_a_yaml_error(text):
    """Whatever an admin's editor leaves in the file, the user sees one sentence, never a traceback."""
    try:
        data = load(text, "f.yaml")
    except YamlError as e:
        lines = (text.count("\n") if isinstance(text, str) else text.count(b"\n")) + 1
        assert str(e).startswith("f.yaml:") and 1 <= e.line <= lines + 1 and "\n" not in e.message
    else:
        assert isinstance(data, YamlMapping)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10))
KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
DOCUMENTS = st.dictionaries(KEYS, st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                                               max_leaves=10), min_size=1, max_size=5)


@PROPERTY
@given(DOCUMENTS, st.booleans())
def test_loads_what_safe_load_loads_and_knows_where(document, flow):
    """Where safe_load is right (no repeated keys, merges or tags), the values are its values, and each line holds its key."""
    text = yaml.safe_dump(document, default_flow_style=flow, width=10**6)
    data = load(text, "f.yaml")
    assert data == yaml.safe_load(text) == document
    for key, line in data.lines.items():
        assert key in text.splitlines()[line - 1]
