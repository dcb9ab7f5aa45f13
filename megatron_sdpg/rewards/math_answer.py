"""Math verifier: extract the final answer (``\\boxed{}`` first) and test equivalence with math-verify.

math-verify (Hugging Face) parses LaTeX and plain expressions into sympy and checks
equivalence (``\\frac{1}{2}`` = ``0.5``, ``x=3`` = ``3``, intervals, sets,
matrices). Its own signal-based timeouts are switched off: the verifier pool runs
every call in a worker process it kills at the configured timeout.
"""

from __future__ import annotations

import logging

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
from math_verify import verify as math_equal

# math-verify warns on every call that its timeouts are off; the pool provides them.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_PRED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_GOLD_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())


def verify(response: str, answer: str) -> bool:
    """True iff the response's final answer is mathematically equal to ``answer``."""
    gold_text = answer if "\\boxed" in answer or "$" in answer else f"${answer}$"
    gold = parse(gold_text, extraction_config=_GOLD_CONFIG, parsing_timeout=None)
    if not gold:
        return False
    pred = parse(response, extraction_config=_PRED_CONFIG, parsing_timeout=None)
    if not pred:
        return False
    return bool(math_equal(gold, pred, timeout_seconds=None))
