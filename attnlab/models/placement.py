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
from ..errors import AttnlabError


def resolve_blocks(spec, depths, default_stages=None):
    n = len(depths)
    if spec is None:
        spec = "all" if default_stages is None else [s if s >= 0 else n + s for s in default_stages]
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return [[True] * d for d in depths]
        if text and set(text) <= set("01-"):
            spec = text.split("-")
        else:
            try:
                spec = [int(s) for s in text.split(",") if s.strip()]
            except ValueError:
                raise AttnlabError(
                    f"blocks='{spec}' is not understood; use 'all', stage indices like '2,3', "
                    "or per-stage bit strings like '100-1011-010011-011'") from None
    if isinstance(spec, dict):
        masks = [[False] * d for d in depths]
        for stage, which in spec.items():
            stage = _stage_index(stage, n)
            idx = range(depths[stage]) if which == "all" else which
            for b in idx:
                if not 0 <= int(b) < depths[stage]:
                    raise AttnlabError(f"blocks: stage {stage} has {depths[stage]} blocks, no block {b}")
                masks[stage][int(b)] = True
        return masks
    spec = list(spec)
    if spec and all(isinstance(s, str) for s in spec):
        if len(spec) != n or any(len(s) != d or set(s) - set("01") for s, d in zip(spec, depths)):
            raise AttnlabError(
                f"blocks: bit strings must be one per stage with lengths {list(depths)} of 0/1, got {spec}")
        return [[c == "1" for c in s] for s in spec]
    stages = {_stage_index(s, n) for s in spec}
    return [[i in stages] * d for i, d in enumerate(depths)]


def _stage_index(stage, n):
    try:
        s = int(stage)
    except (TypeError, ValueError):
        raise AttnlabError(f"blocks: stage '{stage}' is not an integer") from None
    if not -n <= s < n:
        raise AttnlabError(f"blocks: stage {s} out of range; this model has stages 0..{n - 1}")
    return s % n
