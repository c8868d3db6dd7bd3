"""The README's shell commands, as tests read them: tests/test_readme.py runs each, and a
test that runs one with checks of its own takes it from here (`readme_args`)."""

from __future__ import annotations

import re
import shlex

from tests.conftest import REPO


def readme_commands() -> list[str]:
    """Each line of the README's ```bash blocks, comments and continuations folded."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line.split("  #")[0]).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = list(dict.fromkeys(readme_commands()))  # a repeated command runs once


def readme_args(start: str, *words: str) -> list[str]:
    """The arguments after `start` of the one README command that starts with it and holds
    each of `words`: for a test that runs that command with assertions of its own (the
    README case then skips it, naming that test)."""
    skip = len(shlex.split(start))
    found = [
        shlex.split(c)[skip:]
        for c in COMMANDS
        if c.startswith(start + " ") and all(w in shlex.split(c) for w in words)
    ]
    if len(found) > 1:  # the one with these words only
        found = [args for args in found if args == list(words)]
    assert len(found) == 1, f"README commands starting {start!r} with {words}: {found}"
    return found[0]
