"""One-line messages for the errors a user causes, including Hydra's and OmegaConf's.

`describe_user_error(e)` returns the line to print, or None when `e` is a bug
that must keep its traceback. Hydra reports its own composition errors as
several lines plus a search path; here they become one line that says what is
wrong and how to fix it, with "did you mean" hints for misspelled keys.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from trainer.errors import UserError

OVERRIDE_GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def did_you_mean(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.75) -> str:
    """'; did you mean a or b?' for close matches of `word`, else ''."""
    matches = close_matches(word, choices, n, cutoff)
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


def close_matches(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.75) -> list[str]:
    """Close matches of a dotted key: siblings first, then the same name elsewhere.

    The second step catches a right name in the wrong place: `lr` -> `optimizer.lr`.
    """
    parent, _, leaf = word.rpartition(".")
    ancestors = {word.rsplit(".", i)[0] for i in range(1, word.count(".") + 1)}
    choices = sorted(set(choices) - ancestors - {word})
    siblings = {c.rpartition(".")[2]: c for c in choices if c.rpartition(".")[0] == parent}
    matches = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n, cutoff)]
    if matches:
        return matches
    by_leaf: dict[str, list[str]] = {}
    for choice in choices:
        by_leaf.setdefault(choice.rpartition(".")[2], []).append(choice)
    for name in difflib.get_close_matches(leaf, list(by_leaf), n, 0.8):
        matches += by_leaf[name]
    matches += [c for c in difflib.get_close_matches(word, choices, n, 0.8) if c not in matches]
    return matches[:n]


def dotted_keys(container: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """Every key of a nested dict/list structure, as dotted paths (inner nodes too)."""
    keys: list[str] = []
    if isinstance(container, dict):
        for key, value in container.items():
            path = f"{prefix}{key}"
            if path in skip:
                continue
            keys.append(path)
            keys += dotted_keys(value, path + ".", skip)
    return keys


def describe_user_error(error: BaseException) -> str | None:
    """The one line to show for a user-caused error, or None for a bug."""
    from hydra.errors import (
        InstantiationException,
        MissingConfigException,
        OverrideParseException,
        SearchPathException,
    )
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(error, UserError):
        return _one_line(str(error), details=True)
    if isinstance(error, MissingConfigException):
        return _missing_config(error)
    if isinstance(error, OverrideParseException):
        first = _first_line(error.message)
        if first.startswith("LexerNoViableAltException: "):
            first = "unexpected character"
        return (
            f"cannot parse the override {error.override!r}: {first}; see {OVERRIDE_GRAMMAR_URL} "
            "(quote values with special characters: key='a,b')"
        )
    if isinstance(error, SearchPathException):
        return _one_line(str(error))
    if _is_composition_error(error):
        return _composition_error(error)
    if isinstance(error, InstantiationException):
        return _instantiation_error(error)
    if isinstance(error, MissingMandatoryValue):
        key = getattr(error, "full_key", None) or "a required value"
        return f"{key} is required but not set; add {key}=... to the command"
    if _is_interpolation_error(error):
        key = getattr(error, "full_key", None)
        where = f" in {key}" if key else ""
        return f"cannot resolve an interpolation{where}: {_first_line(str(error))}"
    return None


def _is_composition_error(error: BaseException) -> bool:
    from hydra.errors import ConfigCompositionException

    return isinstance(error, ConfigCompositionException)


def _is_interpolation_error(error: BaseException) -> bool:
    from omegaconf.errors import InterpolationResolutionError

    return isinstance(error, InterpolationResolutionError)


def _missing_config(error: Any) -> str:
    message = str(error)
    missing = error.missing_cfg_file or ""
    if message.startswith("Cannot find primary config"):
        return f"there is no config named {missing!r} (check --config-name / -cn)"
    group_match = re.search(r"Available options in '([^']+)'", message)
    group = group_match.group(1) if group_match else missing.rpartition("/")[0]
    option = missing[len(group) + 1 :] if missing.startswith(group + "/") else missing
    options = list(error.options or [])
    if not options:
        return f"{group}={option} is not an option: config group {group!r} has no options"
    hint = did_you_mean(option, options)
    return f"{group}={option} is not an option; available: {', '.join(options)}{hint}"


def _composition_error(error: BaseException) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = error.__cause__
    if isinstance(cause, ConfigKeyError | ConfigAttributeError):
        return _unknown_key(cause)
    if isinstance(cause, ValidationError):
        key = getattr(cause, "full_key", None) or "a value"
        return f"{key}={cause.value!r} has the wrong type: {_first_line(cause.msg)}"
    message = str(error)
    if message.startswith("Ambiguous value for argument"):
        argument = re.search(r"argument '([^']+)'", message)
        return (
            f"{argument.group(1) if argument else 'an override'} is ambiguous: write "
            "key=[a,b] for a list, key='a,b' for a string, or add --multirun to sweep"
        )
    if isinstance(cause, UserError):
        return _one_line(str(cause), details=True)
    return _one_line(message)


def _unknown_key(cause: Any) -> str:
    from omegaconf import OmegaConf

    full_key = cause.full_key or str(cause.key)
    parent = cause.parent_node
    choices: list[str] = []
    if parent is not None:
        root = parent._get_root()
        container = OmegaConf.to_container(root, resolve=False, throw_on_missing=False)
        skip = () if full_key.startswith("hydra.") else ("hydra",)
        choices = dotted_keys(container, skip=skip)
    hint = did_you_mean(full_key, choices)
    if not hint and parent is not None:
        section = full_key.rpartition(".")[0]
        known = [k for k in parent.keys() if not str(k).startswith("_")]
        hint = f"; {section or 'the top level'} has: {', '.join(map(str, known))}"
    return f"unknown config key {full_key}{hint}"


def _instantiation_error(error: BaseException) -> str | None:
    cause = error.__cause__
    if isinstance(cause, UserError):
        return _one_line(str(cause), details=True)
    full_key = re.search(r"full_key: (\S+)", str(error))
    section = full_key.group(1) if full_key else "a config section"
    if str(error).startswith("Error locating target") and cause is not None:
        target = re.search(r"target '([^']+)'", str(error))
        name = target.group(1) if target else "?"
        last_line = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
        return f"{section}._target_={name} cannot be imported: {last_line}"
    if isinstance(cause, OSError) and cause.filename:
        # A user's dataset or model reading a file that is not there (or not readable).
        return f"{section}: cannot read {cause.filename} ({cause.strerror}); check the path"
    if isinstance(cause, TypeError) and cause.__traceback__ and cause.__traceback__.tb_next is None:
        # Raised by the call itself (bad arguments), not by code inside the target.
        return f"{section}: {_first_line(str(cause))}; check the keys under {section}"
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _one_line(text: str, details: bool = False) -> str:
    """Error text as one line: a multi-line message is joined with ' | '. With `details`
    (our own UserErrors), the indented detail lines after the first line
    (trainer/errors.py) stay lines of their own, under the line that says what to do."""
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    if not details:
        return " | ".join(line.strip() for line in lines)
    head = [line.strip() for i, line in enumerate(lines) if i == 0 or not line.startswith(" ")]
    indented = [line for line in lines[1:] if line.startswith(" ")]
    return "\n".join([" | ".join(head), *indented])
