"""The conformance suite: the API's behaviours as checks that run against any URL.

``tests/conformance`` runs every check against every step; ``python -m engines_compare conform
--url URL`` runs them against any engine and prints a feature matrix.
"""
from engines_compare.conformance import checks_errors as _register_error_checks  # noqa: F401
from engines_compare.conformance.checks import CHECKS, Ctx, Unsupported
from engines_compare.conformance.runner import CheckResult, connect, run_conformance

__all__ = ["CHECKS", "CheckResult", "Ctx", "Unsupported", "connect", "run_conformance"]
