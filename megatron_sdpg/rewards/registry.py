"""Verifier names -> functions, and the plugin path for user code.

A verifier is a module-level function ``fn(response: str, answer: str) -> bool``.
Built-ins are named here and imported lazily (math-verify pulls in sympy, which
other verifiers do not need). User code is named ``"package.module:function"``;
it is imported by the worker processes, so it must be importable there (installed,
or on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

Verifier = Callable[[str, str], bool]

BUILTIN_VERIFIERS: dict[str, str] = {
    "math": "megatron_sdpg.rewards.math_answer:verify",
    "exact_match": "megatron_sdpg.rewards.exact_match:verify",
    "numeric": "megatron_sdpg.rewards.numeric:verify",
    "worked_sum": "megatron_sdpg.rewards.worked_sum:verify",
}


def verifier_path(spec: str) -> str:
    """``"module:function"`` for a built-in name or a plugin path.

    Raises:
        ValueError: neither a built-in name nor of the form ``module:function``.
    """
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    module, sep, func = spec.partition(":")
    if not sep or not module or not func or ":" in func:
        raise ValueError(
            f"unknown verifier {spec!r}: use one of {sorted(BUILTIN_VERIFIERS)} "
            "or a plugin path 'package.module:function'"
        )
    return spec


def resolve_verifier(spec: str) -> Verifier:
    """Imports and returns the verifier function named by ``spec``.

    Raises:
        ValueError: bad name, module not importable, or attribute missing / not callable.
    """
    path = verifier_path(spec)
    module_name, _, func_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"verifier {spec!r}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"verifier {spec!r}: {module_name!r} has no callable {func_name!r}")
    return fn
