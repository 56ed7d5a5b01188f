"""One exception type for bad input: the CLI prints its message as one line and exits with code 2."""
import difflib


class AttnlabError(ValueError):
    """Bad input from the user (unknown name, bad option, missing data). The message is one line."""


def unknown(kind: str, name, choices) -> AttnlabError:
    """Build the standard 'unknown X' error listing the valid choices and the closest matches."""
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(name), choices, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return AttnlabError(f"unknown {kind} '{name}'{hint}; valid choices: {', '.join(choices)}")
