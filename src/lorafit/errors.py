"""The exception lorafit raises for problems a user can fix, and the one for a run stopped early."""

from __future__ import annotations


class LorafitError(Exception):
    """A problem with the user's input, files or settings.

    The message names what is wrong (file, line, field) and what was expected; the CLI
    prints it as one paragraph without a traceback (unless ``--debug``).
    """


class RunStopped(Exception):
    """Training stopped on request (SIGINT, SIGTERM) after saving a checkpoint.

    The message says where the checkpoint is and how to resume; ``exit_code`` is the shell's
    convention for the signal (128 + its number).
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    import difflib

    # str(): keys read from YAML can be numbers or booleans
    close = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
