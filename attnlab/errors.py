"""One exception type for bad input: the CLI prints its message as one line and exits with code 2."""
import argparse
import difflib
import operator


class AttnlabError(ValueError):
    """Bad input from the user (unknown name, bad option, missing data). The message is one line."""


def unknown(kind: str, name, choices) -> AttnlabError:
    """Build the standard 'unknown X' error listing the valid choices and the closest matches."""
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(name), choices, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return AttnlabError(f"unknown {kind} '{name}'{hint}; valid choices: {', '.join(choices)}")


def yaml_problem(err: Exception) -> str:
    """A YAML parse error in one line, with where it is: "did not find expected ',' or ']' at line 4, column 5
    (while parsing a flow sequence begun at line 3, column 15)". PyYAML's own text takes four lines."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if not problem or mark is None:
        return " ".join(str(err).split())
    where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    context, started = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and started is not None:
        return f"{where} ({context} begun at line {started.line + 1}, column {started.column + 1})"
    return f"{where} ({context})" if context else where


def check_int(name: str, value, minimum: int = 1, odd: bool = False) -> int:
    """Validate an integer option of a module (``reduction``, ``kernel_size``); raise ValueError naming it.

    Plain ValueError on purpose: ``attention.create`` turns it into a one-line AttnlabError naming the module.
    """
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum and not (odd and value % 2 == 0)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be {'an odd' if odd else 'an'} integer >= {minimum}, got {value!r}")
    return operator.index(value)


def check_positive(name: str, value) -> float:
    """Validate a module's positive real option (``eps``, ``e_lambda``): a finite number > 0 (NaN or infinity
    would turn every output into NaN); plain ValueError as ``check_int``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    """``check_bool`` for an argument of a model builder: the one-line AttnlabError itself (``bool("false")`` is
    True, so a string must never be read as a flag)."""
    if not isinstance(value, bool):
        raise AttnlabError(f"{name} must be True or False, got {value!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a command's count or size option: an integer >= 1 (0 is refused, not read as 'the
    default')."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return n
