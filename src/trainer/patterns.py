"""Glob patterns over dotted parameter and module names."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from trainer.errors import ConfigError


def matches(name: str, pattern: str) -> bool:
    """`features.*` and `features` both match `features.0.weight`; `*` crosses dots."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    return any(matches(name, pattern) for pattern in patterns)


def check_all_match(patterns: Sequence[str], names: Iterable[str], what: str, key: str) -> None:
    """A pattern that matches nothing is almost always a typo: say so, with the real names."""
    names = list(names)
    for pattern in patterns:
        if not any(matches(name, pattern) for name in names):
            more = f" and {len(names) - 12} more" if len(names) > 12 else ""
            shown = ", ".join(names[:12]) + more
            raise ConfigError(
                f"{key} pattern {pattern!r} matches no {what}; the model's {what}s are: {shown}"
            )
