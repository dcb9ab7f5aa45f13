"""SGLang's own definitions, read from the installed package without its GPU dependencies.

``requirements/contract.txt`` pins sglang and sglang-router; ``tools/run_tests.sh``
installs them with ``--no-deps``. Three modules import with the light packages
listed there (``sampling_params``, ``server_args``, ``router_args``); ``import_light``
loads them without running ``sglang/__init__.py`` (which pulls in FlashInfer and
CUDA torch). Everything else -- the request structs in ``io_struct.py``, the finish
reasons in ``schedule_batch.py``, the ``meta_info`` built by ``tokenizer_manager.py``,
the routes of ``http_server.py`` -- is read from the installed source with ``ast``;
small self-contained pieces (finish-reason classes, ``detokenize_logprob_tokens``)
are compiled from that source and run.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
import typing
from functools import lru_cache
from typing import Any

import msgspec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIREMENTS = os.path.join(ROOT, "requirements", "contract.txt")
INSTALL_HINT = "pip install --no-deps -r requirements/contract.txt (tools/run_tests.sh does)"


def pinned_versions() -> dict[str, str]:
    """``{"sglang": "0.5.23", "sglang-router": "0.3.2", ...}`` from ``requirements/contract.txt``."""
    out = {}
    with open(REQUIREMENTS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                out[name.strip().lower()] = version.strip()
    return out


def version_problems() -> list[str]:
    """Why the installed sglang / sglang-router are not the pinned ones (empty when they are)."""
    problems = []
    pins = pinned_versions()
    for dist in ("sglang", "sglang-router"):
        try:
            got = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dist} is not installed: {INSTALL_HINT}")
            continue
        if got != pins[dist]:
            problems.append(f"{dist} {got} is installed but requirements/contract.txt pins {pins[dist]}: {INSTALL_HINT}")
    return problems


@lru_cache(maxsize=None)
def sglang_dir() -> str:
    stub = sys.modules.get("sglang")
    if stub is not None and getattr(stub, "__spec__", None) is None and getattr(stub, "__path__", None):
        return list(stub.__path__)[0]  # import_light's package stand-in
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"sglang is not installed: {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


def source_path(relpath: str) -> str:
    """``srt/managers/io_struct.py`` -> its installed path."""
    return os.path.join(sglang_dir(), *relpath.split("/"))


def import_light(name: str) -> types.ModuleType:
    """Imports ``sglang.<...>`` without executing ``sglang/__init__.py`` (its imports need a GPU stack)."""
    if name.startswith("sglang.") and "sglang" not in sys.modules:
        pkg = types.ModuleType("sglang")
        pkg.__path__ = [sglang_dir()]
        sys.modules["sglang"] = pkg
    return importlib.import_module(name)


@lru_cache(maxsize=None)
def parse(relpath: str) -> ast.Module:
    with open(source_path(relpath)) as f:
        return ast.parse(f.read(), filename=relpath)


def _classes(relpath: str) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in parse(relpath).body if isinstance(n, ast.ClassDef)}


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of an SGLang request class: its name, annotation (source) and whether it has no default."""

    name: str
    annotation: str
    required: bool


def class_fields(relpath: str, class_name: str) -> dict[str, Field]:
    """The fields of a dataclass / ``msgspec.Struct`` defined in ``relpath``, base classes of the same file first.

    Raises:
        KeyError: No class of that name in the file (SGLang renamed or moved it).
    """
    classes = _classes(relpath)
    if class_name not in classes:
        raise KeyError(f"sglang/{relpath} defines no class {class_name}")
    node = classes[class_name]
    fields: dict[str, Field] = {}
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields.update(class_fields(relpath, base.id))
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            ann = ast.unparse(stmt.annotation)
            if ann.startswith("ClassVar"):
                continue
            required = stmt.value is None
            if isinstance(stmt.value, ast.Call) and ast.unparse(stmt.value.func) == "field":
                kw = {k.arg for k in stmt.value.keywords}
                required = not ({"default", "default_factory"} & kw)
            fields[stmt.target.id] = Field(stmt.target.id, ann, required)
    return fields


class _Opaque:
    """Stands for a name of SGLang's that the annotation namespace lacks (a class of theirs, a validator)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> "_Opaque":
        return self

    def __getattr__(self, item: str) -> "_Opaque":
        return _Opaque(f"{self.name}.{item}")

    def __getitem__(self, item: Any) -> "_Opaque":
        return self


class _Namespace(dict):
    def __missing__(self, key: str) -> Any:
        return _Opaque(key)


_TYPING = {name: getattr(typing, name) for name in dir(typing) if not name.startswith("_")}


def annotation_type(annotation: str) -> Any | None:
    """The annotation evaluated to a type (SGLang's own classes and validators become opaque
    stand-ins), or ``None`` when it does not evaluate."""
    ns = _Namespace({**_TYPING, "bytes": bytes, "str": str, "int": int, "float": float, "bool": bool,
                     "dict": dict, "list": list})
    try:
        return eval(annotation, {"__builtins__": {}}, ns)  # noqa: S307 - an annotation from SGLang's installed source
    except (TypeError, NameError, SyntaxError, AttributeError):
        return None


def value_error(value: Any, tp: Any) -> str | None:
    """Why ``value`` is not a ``tp`` (strict msgspec conversion), or ``None`` when it is.

    Unions msgspec cannot express (two list types) are tried member by member.

    Raises:
        TypeError: ``tp`` holds a type that cannot be checked here (one of SGLang's classes).
    """
    try:
        msgspec.convert(value, tp)
        return None
    except msgspec.ValidationError as e:
        return str(e)
    except TypeError:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            return value_error(value, typing.get_args(tp)[0])
        if origin is typing.Union:
            errors = []
            for member in typing.get_args(tp):
                err = value_error(value, member)
                if err is None:
                    return None
                errors.append(err)
            return " / ".join(errors)
        raise


def body_problems(body: dict[str, Any], fields: dict[str, Field], what: str) -> list[str]:
    """What in ``body`` SGLang would drop or refuse: unknown keys (SGLang ignores them silently),
    missing required fields, values of the wrong type (checked strictly with msgspec), and
    values whose type cannot be checked here (so that no field goes unchecked unnoticed)."""
    problems = []
    for key, value in body.items():
        if key not in fields:
            problems.append(f"{what}: SGLang has no field {key!r} (known: {sorted(fields)})")
            continue
        tp = annotation_type(fields[key].annotation)
        try:
            err = "annotation does not evaluate" if tp is None else value_error(value, tp)
        except TypeError as e:
            err = f"cannot be checked ({e})"
        if err is not None:
            problems.append(f"{what}.{key} = {value!r:.80}: not a {fields[key].annotation} ({err})")
    for f in fields.values():
        if f.required and f.name not in body:
            problems.append(f"{what}: required field {f.name!r} missing")
    return problems


def compile_classes(relpath: str, names: list[str], namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compiles the named top-level classes of ``relpath`` (in file order) and returns them."""
    classes = _classes(relpath)
    module = ast.Module(body=[classes[n] for n in names], type_ignores=[])
    ns: dict[str, Any] = {**_TYPING, **(namespace or {})}
    exec(compile(module, f"sglang/{relpath}", "exec"), ns)  # noqa: S102 - SGLang's own installed source
    return {n: ns[n] for n in names}


def method_as_function(relpath: str, class_name: str, method: str) -> Any:
    """A method of a class in ``relpath``, compiled on its own (call it with any ``self``)."""
    node = next(m for m in _classes(relpath)[class_name].body
                if isinstance(m, ast.FunctionDef) and m.name == method)
    module = ast.Module(body=[node], type_ignores=[])
    ns: dict[str, Any] = dict(_TYPING)
    exec(compile(module, f"sglang/{relpath}", "exec"), ns)  # noqa: S102
    return ns[method]


def dict_keys_assigned(relpath: str, variable: str) -> set[str]:
    """Every string key ``relpath`` puts into ``variable``: ``v = {...}``, ``v["k"] = ...``, ``v.update({...})``."""
    keys: set[str] = set()

    def literal_keys(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Dict):
            return {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        return set()

    for node in ast.walk(parse(relpath)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == variable:
                    keys |= literal_keys(node.value)
                if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                        and target.value.id == variable and isinstance(target.slice, ast.Constant)):
                    keys.add(target.slice.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == variable and node.args):
            keys |= literal_keys(node.args[0])
    return keys


def http_routes(relpath: str = "srt/entrypoints/http_server.py") -> dict[str, set[str]]:
    """``{path: {"GET", "POST", ...}}`` from the ``@app.get/post/api_route`` decorators."""
    routes: dict[str, set[str]] = {}
    for node in ast.walk(parse(relpath)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app" and dec.args
                    and isinstance(dec.args[0], ast.Constant)):
                continue
            path, kind = dec.args[0].value, dec.func.attr
            if kind in ("get", "post", "put", "delete"):
                methods = {kind.upper()}
            elif kind == "api_route":
                kw = {k.arg: k.value for k in dec.keywords}
                methods = {e.value for e in kw["methods"].elts} if "methods" in kw else {"GET"}
            else:
                continue
            routes.setdefault(path, set()).update(methods)
    return routes
