"""A griffe extension for the docs build: every public class shows its constructor signature.

Most of jadeis' classes are equinox Modules: dataclasses whose ``__init__`` equinox generates
at class creation, so the source (which griffe reads) has no ``__init__`` and the API pages
would show no parameters and no defaults. For every class in ``jadeis.__all__`` without an
``__init__`` in its source, this imports the class and adds to griffe's view an ``__init__``
with the signature Python reports at run time (``inspect.signature``): the fields in
dataclass order (inherited fields first), their defaults, keyword-only markers. New classes
are covered by being exported; nothing here lists them.

Where the source writes a default as a constant's name (``coupling=DEFAULT_COUPLING``), in a
written ``__init__`` or a public function, the page shows the value (``coupling=0.999``).

Abstract classes (``AbstractX``, or with abstract methods) get no signature: they are not
constructed.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import typing

import griffe

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


def is_abstract(cls: type) -> bool:
    return inspect.isabstract(cls) or cls.__name__.startswith("Abstract")


def _annotation(annotation) -> str | None:
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, typing.ForwardRef):
        return annotation.__forward_arg__
    return inspect.formatannotation(annotation)


def _literal(value) -> str:
    """``repr(value)``, with strings in double quotes as the source code writes them."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid Python literal too
    if type(value) is list:
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if type(value) is tuple:
        return "(" + ", ".join(_literal(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return re.sub(r"\s+", " ", repr(value))


def _default(default) -> str | None:
    return None if default is inspect.Parameter.empty else _literal(default)


def runtime_parameters(cls: type) -> griffe.Parameters | None:
    """The parameters of ``cls(...)`` as griffe parameters, ``self`` first; None when Python
    reports nothing better than ``(*args, **kwargs)``."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    if [p.kind for p in params] == [
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
    ]:
        return None
    return griffe.Parameters(
        griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword),
        *(
            griffe.Parameter(
                p.name,
                annotation=_annotation(p.annotation),
                kind=_KINDS[p.kind],
                default=_default(p.default),
            )
            for p in params
        ),
    )


_NAME = re.compile(r"[A-Za-z_][\w.]*")


def _is_literal(value) -> bool:
    try:
        return ast.literal_eval(_literal(value)) == value
    except (ValueError, SyntaxError, TypeError):
        return False


def show_constant_defaults(function: griffe.Function, runtime) -> None:
    """Where the source writes a default as a name (``coupling=DEFAULT_COUPLING``), show its
    value (``coupling=0.999``) when that value is a literal."""
    try:
        signature = inspect.signature(runtime)
    except (TypeError, ValueError):
        return
    for parameter in function.parameters:
        value = signature.parameters.get(parameter.name)
        if (
            value is not None
            and parameter.default is not None
            and _NAME.fullmatch(str(parameter.default))
            and str(parameter.default) not in ("None", "True", "False")
            and _is_literal(value.default)
        ):
            parameter.default = _literal(value.default)


class RuntimeSignatures(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.path != "jadeis":
            return
        module = importlib.import_module(pkg.path)
        for name in module.__all__:
            obj = getattr(module, name)
            target = pkg[name].final_target if pkg[name].is_alias else pkg[name]
            if isinstance(target, griffe.Function):
                show_constant_defaults(target, obj)
            if not inspect.isclass(obj) or is_abstract(obj) or not isinstance(target, griffe.Class):
                continue
            if "__init__" in target.members:  # written in the source: griffe reads it there
                show_constant_defaults(target.members["__init__"], obj)
                continue
            cls = obj
            parameters = runtime_parameters(cls)
            if parameters is None:
                continue
            target.set_member(
                "__init__",
                griffe.Function(
                    "__init__",
                    lineno=target.lineno,
                    endlineno=target.lineno,
                    parent=target,
                    parameters=parameters,
                    returns="None",
                ),
            )
