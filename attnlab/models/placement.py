"""Which residual blocks get attention: the ``blocks`` argument of ``create_model``.

Accepted forms (stages are 0-based: ImageNet ``layer3`` is stage 2):
  * ``None``: the attention's own default (``default_stages`` on its class; every block when it has none);
  * ``"all"``: every block;
  * a list of stage indices, ``[2, 3]``, or the same as a string, ``"2,3"``;
  * a list of per-stage bit strings, one character per block, ``["100", "1011", "010011", "011"]``
    (EAN's connection schemes), or the same joined by '-' as a string;
  * a dict ``{stage: "all" | [block indices]}``.
Result: one list of booleans per stage.
"""
import operator
from collections.abc import Iterable, Mapping

from ..errors import AttnlabError

_FORMS = "use 'all', stage indices like '2,3', per-stage bit strings like '100-1011-010011-011', or a dict"


def resolve_blocks(spec, depths, default_stages=None):
    n = len(depths)
    if spec is None:
        spec = "all" if default_stages is None else [s if s >= 0 else n + s for s in default_stages]
    if not isinstance(spec, str) and _is_int(spec):
        spec = [spec]
    if isinstance(spec, str):
        text = spec.strip()
        if not text.strip(", "):  # '' or ',' would silently give a model without attention
            raise AttnlabError(f"blocks={spec!r} selects no block; {_FORMS} (or attention='none' for none)")
        if text == "all":
            return [[True] * d for d in depths]
        # A lone "0"/"1" is a stage index; any longer 0/1 string, or 0/1 groups joined by '-', is per-stage bits
        # ("-1" is the last stage: its '-' joins no groups).
        grouped = "-" in text and all(text.split("-"))
        if text and set(text) <= set("01-") and (grouped or ("-" not in text and (len(text) > 1 or n == 1))):
            spec = text.split("-")
        else:
            try:
                spec = [int(s) for s in text.split(",") if s.strip()]
            except ValueError:
                raise AttnlabError(f"blocks='{spec}' is not understood; {_FORMS}") from None
    if isinstance(spec, Mapping):  # also omegaconf's DictConfig
        masks = [[False] * d for d in depths]
        for stage, which in spec.items():
            stage = _stage_index(stage, n)
            if not isinstance(which, str) and _is_int(which):
                which = [which]
            idx = range(depths[stage]) if which == "all" else which
            if isinstance(idx, str) or not isinstance(idx, Iterable):
                raise AttnlabError(f"blocks: stage {stage} wants 'all' or a list of block indices, got {which!r}")
            for b in idx:
                if not _is_int(b) or not 0 <= int(b) < depths[stage]:
                    raise AttnlabError(
                        f"blocks: stage {stage} has blocks 0..{depths[stage] - 1}, got block {b!r}")
                masks[stage][int(b)] = True
        return masks
    if not isinstance(spec, Iterable):
        raise AttnlabError(f"blocks={spec!r} is not understood; {_FORMS}")
    spec = list(spec)
    if not spec:
        raise AttnlabError(f"blocks=[] selects no block; {_FORMS} (or attention='none' for none)")
    if all(isinstance(s, str) for s in spec):
        if len(spec) != n or any(len(s) != d or set(s) - set("01") for s, d in zip(spec, depths)):
            raise AttnlabError(
                f"blocks: bit strings must be one per stage with lengths {list(depths)} of 0/1, got {spec}")
        return [[c == "1" for c in s] for s in spec]
    stages = {_stage_index(s, n) for s in spec}
    return [[i in stages] * d for i, d in enumerate(depths)]


def _is_int(v):
    if isinstance(v, str):
        return v.strip().lstrip("-").isdigit()
    try:
        operator.index(v)
    except TypeError:
        return False
    return not isinstance(v, bool)


def _stage_index(stage, n):
    if not _is_int(stage):
        raise AttnlabError(f"blocks: stage {stage!r} is not an integer")
    s = int(stage)
    if not -n <= s < n:
        raise AttnlabError(f"blocks: stage {s} out of range; this model has stages 0..{n - 1}")
    return s % n
