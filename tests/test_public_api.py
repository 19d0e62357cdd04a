"""The public surface: every name documented, and every `Args:` section true to its signature."""

from __future__ import annotations

import inspect
import re

import pytest

import lora_jax as lj

SECTION = re.compile(r"^(Args|Returns|Raises|Example|Examples|Yields|Attributes|Note):\s*$")


def _documented_args(doc: str) -> list[str] | None:
    lines = doc.splitlines()
    if "Args:" not in lines:
        return None
    names = []
    for line in lines[lines.index("Args:") + 1 :]:
        if SECTION.match(line):
            break
        hit = re.match(r"^    (\*{0,2}\w+)(?: \([^)]*\))?:", line)
        if hit:
            names.append(hit.group(1))
    return names


def _signature_args(fn) -> list[str]:
    names = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in ("self", "cls"):
            continue
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        names.append(prefix + p.name)
    return names


def _public_callables():
    for name in lj.__all__:
        obj = getattr(lj, name)
        yield name, obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                own = getattr(member, "__module__", "").startswith("lora_jax")
                if not attr.startswith("_") and inspect.isfunction(member) and own:
                    yield f"{name}.{attr}", member


def test_all_names_exist_and_are_documented():
    for name in lj.__all__:
        assert hasattr(lj, name), name
        obj = getattr(lj, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


CALLABLES = list(_public_callables())


@pytest.mark.parametrize(("name", "fn"), CALLABLES, ids=[name for name, _ in CALLABLES])
def test_args_section_matches_signature(name, fn):
    if not inspect.isfunction(fn):
        return
    doc = inspect.getdoc(fn) or ""
    assert doc, f"{name} has no docstring"
    documented = _documented_args(doc)
    expected = _signature_args(fn)
    if documented is None:
        assert not expected, f"{name} takes {expected} but has no Args: section"
    else:
        assert documented == expected, f"{name}: Args {documented} != signature {expected}"


def test_functions_with_parameters_have_examples():
    for name in lj.__all__:
        obj = getattr(lj, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert ">>>" in (inspect.getdoc(obj) or ""), f"{name} has no runnable example"
