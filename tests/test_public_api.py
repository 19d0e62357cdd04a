"""The public surface: a small top level with namespaces, every name documented, every
`Args:` section true to its signature; and the package's architecture rules, read from the
source (no underscore imports across modules, frameworks apart, short files)."""

from __future__ import annotations

import ast
import inspect
import pathlib
import re
import types

import pytest

import lora_jax as lj

PACKAGE = pathlib.Path(lj.__file__).parent
NAMESPACES = [n for n in lj.__all__ if isinstance(getattr(lj, n), types.ModuleType)]

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


def _public_names():
    """``(qualified name, object)`` for the top level and every namespace's `__all__`."""
    for name in lj.__all__:
        obj = getattr(lj, name)
        if isinstance(obj, types.ModuleType):
            for sub in obj.__all__:
                yield f"{name}.{sub}", getattr(obj, sub)
        else:
            yield name, obj


def _public_callables():
    for name, obj in _public_names():
        yield name, obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                own = getattr(member, "__module__", "").startswith("lora_jax")
                if not attr.startswith("_") and inspect.isfunction(member) and own:
                    yield f"{name}.{attr}", member


def test_all_names_exist_and_are_documented():
    for name in lj.__all__:
        assert hasattr(lj, name), name
    for name, obj in _public_names():
        if callable(obj) or isinstance(obj, types.ModuleType):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_small_top_level_with_namespaces():
    assert len(lj.__all__) <= 27, lj.__all__
    assert {"nnx", "peft", "multi", "parallel", "optim", "io", "quant", "core", "tokens"} <= set(
        NAMESPACES
    )
    for ns in NAMESPACES:
        module = getattr(lj, ns)
        assert module.__all__, ns
        assert all(hasattr(module, n) for n in module.__all__), ns


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
    for name, obj in _public_names():
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert ">>>" in (inspect.getdoc(obj) or ""), f"{name} has no runnable example"


SOURCES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, str]]:
    """``(module, name)`` for every ``from module import name`` (and ``import module``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_underscore_names(path):
    for module, name in _imports(path):
        if not module.startswith("lora_jax"):
            continue
        assert not name.startswith("_"), f"{path.name}: from {module} import {name}"
        last = module.rsplit(".", 1)[-1]
        assert not (name == "" and last.startswith("_")), f"{path.name}: import {module}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_frameworks_never_import_each_other(path):
    me = _module_name(path)
    targets = {module for module, _ in _imports(path) if module.startswith("lora_jax")}
    if me.startswith(("lora_jax.linen", "lora_jax.core")):
        assert not any(t.startswith("lora_jax.nnx") for t in targets), (me, targets)
    if me.startswith(("lora_jax.nnx", "lora_jax.core")):
        assert not any(t.startswith("lora_jax.linen") for t in targets), (me, targets)
        assert "flax.linen" not in {m for m, _ in _imports(path)}, me
    if me.startswith("lora_jax.core"):
        assert not any(
            t.startswith("lora_jax.") and not t.startswith("lora_jax.core") for t in targets
        ), me


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_are_short_and_private_modules_are_underscored(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 320, f"{path.relative_to(PACKAGE)} has {lines} lines"
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) > 1 and rel.name != "__init__.py":
        assert rel.name.startswith("_"), f"{rel}: modules inside a subpackage are private"
