"""The one exception type lorafit raises for problems a user can fix."""

from __future__ import annotations


class LorafitError(Exception):
    """A problem with the user's input, files or settings.

    The message names what is wrong (file, line, field) and what was expected; the CLI
    prints it as one paragraph without a traceback (unless ``--debug``).
    """


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    import difflib

    # str(): keys read from YAML can be numbers or booleans
    close = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
