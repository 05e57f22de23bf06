"""One-line config problems: each names the field, the value and what is allowed."""
from __future__ import annotations

from typing import Any


def choice_problem(name: str, value: Any, allowed: tuple[str, ...]) -> list[str]:
    """One message if ``value`` is not among ``allowed``."""
    if value in allowed:
        return []
    return [f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}"]


def positive_problem(name: str, value: float) -> list[str]:
    return [] if value > 0 else [f"{name}={value!r} must be > 0"]


def divisors(n: int) -> list[int]:
    """1..n's divisors of ``n``, ascending: the sizes a layout dimension may take."""
    return [d for d in range(1, n + 1) if n % d == 0]
