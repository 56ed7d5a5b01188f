"""A benchmark matrix file: a base recipe, overrides shared by every cell, methods, seeds, latency and claims.

    name: cpu_proxy                    # results/<name>/ and runs/<name>/ (default: the file's stem)
    recipe: configs/quick.yaml         # a configs/*.yaml path, or null for the engine's defaults
    overrides: {model.name: resnet20, train.epochs: 4}
    methods:
      - {name: none, overrides: {model.attention: none}}
      - {name: ssia+se, overrides: {model.attention: se, ssia.enabled: true}}
    seeds: [0, 1, 2]                   # a method may list its own: {name: se, seeds: [0, 1, 2, 3, 4], ...}
    latency: {batch_sizes: [1, 32], warmup: 5, repeats: 20}  # CPU latency at `threads` (1) torch threads
    claims:                            # what the papers say, checked by `attnlab report`
      - {claim: "SSIA beats SE", source: "Wu et al. 2022", method: ssia, baseline: se, paper: "qualitative"}
    reuse: [results/cifar10_resnet20]  # other matrices' results folders: a cell with the same settings and seed
                                       # finished there is copied into this runs.jsonl instead of trained again

A cell is one (method, seed). Its result depends only on the recipe and its merged overrides (its fingerprint), so
methods and claims can be added to a matrix that already has results without touching the finished cells.
"""
import hashlib
import json
import re
from pathlib import Path

import yaml

from ..errors import AttnlabError, unknown, yaml_problem

MATRIX_KEYS = {"name", "description", "recipe", "overrides", "methods", "seeds", "latency", "claims", "reuse"}
METHOD_KEYS = {"name", "overrides", "seeds"}
CLAIM_KEYS = {"claim", "source", "method", "baseline", "paper", "kind", "margin", "latency"}
CLAIM_LATENCY = ("lower",)  # `latency: lower`: the claim is also about inference time (bench/claims.py)
CLAIM_KINDS = ("better", "match")
# threads: torch CPU threads for CPU latency, whatever threads or workers the bench trains with.
LATENCY_DEFAULTS = {"batch_sizes": [1, 32], "gpu_batch_sizes": [1, 256], "warmup": 5, "repeats": 20, "rounds": 5,
                    "threads": 1}


def load_matrix(path) -> dict:
    """Read and check a matrix YAML; returns a dict with name, recipe, overrides, methods, seeds, latency, claims."""
    path = Path(path)
    if not path.is_file():
        raise AttnlabError(f"matrix file '{path}' is a folder, not a YAML file" if path.is_dir() else
                           f"matrix file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AttnlabError(f"matrix {path} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise AttnlabError(f"matrix {path} must be a mapping with 'methods' and 'seeds'")
    _no_extra_keys(raw, MATRIX_KEYS, f"matrix {path}")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise AttnlabError(f"matrix name '{name}' may hold only letters, digits, '.', '_' and '-'")
    methods = _methods(raw.get("methods"), path)
    seeds = raw.get("seeds", [0])
    if not _seed_list(seeds):
        raise AttnlabError(f"matrix {path}: 'seeds' must be a non-empty list of integers >= 0")
    latency = _latency(raw.get("latency") or {}, path)
    return {"name": name, "path": str(path), "description": raw.get("description", ""), "recipe": raw.get("recipe"),
            "recipe_path": (recipe_path := _recipe_path(raw.get("recipe"), path)),
            "recipe_digest": recipe_digest(recipe_path),
            "overrides": _mapping(raw.get("overrides") or {}, f"matrix {path}: 'overrides'"),
            "methods": methods, "seeds": list(seeds), "latency": latency,
            "claims": _claims(raw.get("claims") or [], [m["name"] for m in methods], path),
            "reuse": _reuse_sources(raw.get("reuse") or [], path)}


def _seed_list(seeds) -> bool:
    """Whether ``seeds`` is a non-empty list of integers >= 0 (a run's seed is; bool is not an integer here)."""
    return isinstance(seeds, list) and bool(seeds) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)


def recipe_digest(recipe_path) -> str | None:
    """A short hash of what the recipe file sets (its parsed YAML: comments and layout do not count), recorded with
    each cell: the fingerprint names the recipe only by its path, so this is what notices the file was edited."""
    if recipe_path is None:
        return None
    try:
        content = yaml.safe_load(Path(recipe_path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise AttnlabError(f"cannot read recipe {recipe_path}: {yaml_problem(err)}") from None
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_recipe(record: dict, matrix) -> bool:
    """Whether ``record`` was trained with the recipe as the matrix's file sets it now."""
    return same_digest(record.get("recipe_digest"), matrix.get("recipe_digest"))


def same_digest(a: str | None, b: str | None) -> bool:
    """Whether two recipe digests name the same recipe; a missing one (a record from before digests were kept)
    counts as the same."""
    return a is None or b is None or a == b


def _recipe_path(recipe, matrix_path: Path):
    if recipe is None:
        return None
    found = _find(recipe, matrix_path, Path.is_file)
    if found is None:
        raise AttnlabError(f"matrix {matrix_path}: recipe '{recipe}' not found")
    return str(found)


def _reuse_sources(reuse, matrix_path: Path) -> list[Path]:
    """The results folders named by ``reuse:`` (each holds, or will hold, a runs.jsonl)."""
    if not isinstance(reuse, list) or not all(isinstance(r, str) and r for r in reuse):
        raise AttnlabError(f"matrix {matrix_path}: 'reuse' must be a list of results folders, e.g. "
                           "[results/cifar10_resnet20]")
    out = []
    for r in reuse:
        found = _find(r, matrix_path, Path.is_dir)
        if found is None:
            raise AttnlabError(f"matrix {matrix_path}: reuse folder '{r}' not found")
        out.append(found)
    return out


def _find(name, matrix_path: Path, test):
    """``name`` relative to the working directory, else to a folder above the matrix file (the repository root)."""
    candidates = [Path(name)] + [p / name for p in matrix_path.resolve().parents]
    return next((c for c in candidates if test(c)), None)


def _methods(methods, path) -> list[dict]:
    if not isinstance(methods, list) or not methods:
        raise AttnlabError(f"matrix {path}: 'methods' must be a non-empty list of {{name, overrides}}")
    out, seen, folders = [], set(), {}
    for i, m in enumerate(methods):
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, dict) or "name" not in m:
            raise AttnlabError(f"matrix {path}: method #{i + 1} needs a 'name'")
        _no_extra_keys(m, METHOD_KEYS, f"matrix {path}: method '{m['name']}'")
        name = str(m["name"])
        if name in seen:
            raise AttnlabError(f"matrix {path}: method '{name}' listed twice")
        if slug(name) in folders:  # they would train into one run folder, the second wiping the first
            raise AttnlabError(f"matrix {path}: methods '{folders[slug(name)]}' and '{name}' share the run folder "
                               f"name '{slug(name)}'; rename one")
        seen.add(name)
        folders[slug(name)] = name
        own = m.get("seeds")
        if own is not None and not _seed_list(own):
            raise AttnlabError(f"matrix {path}: method '{name}': 'seeds' must be a non-empty list of integers >= 0")
        out.append({"name": name, "overrides": _mapping(m.get("overrides") or {}, f"method '{name}' overrides"),
                    **({"seeds": list(own)} if own is not None else {})})
    return out


def method_seeds(matrix, method: dict) -> list[int]:
    """The seeds a method runs: its own ``seeds:`` (e.g. more for the methods the claims compare), else the
    matrix's."""
    return method.get("seeds") or matrix["seeds"]


def _claims(claims, method_names, path) -> list[dict]:
    """Each claim: the text, its source, the method and baseline it compares, and the paper's own figure."""
    if not isinstance(claims, list):
        raise AttnlabError(f"matrix {path}: 'claims' must be a list of {{claim, source, method, baseline, paper}}")
    out = []
    for i, c in enumerate(claims, 1):
        where = f"matrix {path}: claim #{i}"
        if not isinstance(c, dict):
            raise AttnlabError(f"{where} must be a mapping with claim, source, method, baseline, paper")
        _no_extra_keys(c, CLAIM_KEYS, where)
        missing = [k for k in ("claim", "method", "baseline") if not c.get(k)]
        if missing:
            raise AttnlabError(f"{where} needs {', '.join(missing)}")
        for key in ("method", "baseline"):
            if str(c[key]) not in method_names:
                raise AttnlabError(f"{where}: {key} '{c[key]}' is not a method of this matrix; methods: "
                                   f"{', '.join(method_names)}")
        if str(c["method"]) == str(c["baseline"]):
            raise AttnlabError(f"{where}: method and baseline are both '{c['method']}'; a claim compares two methods")
        kind = str(c.get("kind", "better"))
        if kind not in CLAIM_KINDS:
            raise AttnlabError(f"{where}: kind must be one of {', '.join(CLAIM_KINDS)}, got '{kind}'")
        if "margin" in c and kind != "match":
            raise AttnlabError(f"{where}: margin is read by kind: match only (an equivalence margin), not by '{kind}'")
        margin = c.get("margin", 0.5 if kind == "match" else 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
            raise AttnlabError(f"{where}: margin must be a non-negative number of points, got {margin!r}")
        latency = c.get("latency")
        if latency is not None and latency not in CLAIM_LATENCY:
            raise AttnlabError(f"{where}: latency must be one of {', '.join(CLAIM_LATENCY)}, got {latency!r}")
        out.append({"claim": str(c["claim"]), "source": str(c.get("source", "")), "method": str(c["method"]),
                    "baseline": str(c["baseline"]), "paper": str(c.get("paper", "")), "kind": kind,
                    "margin": float(margin), "latency_claim": latency})
    return out


def _latency(raw, path) -> dict:
    """The ``latency:`` settings over their defaults, each checked: a typo or a wrong type stops here, not in the
    middle of a bench."""
    where = f"matrix {path}: 'latency'"
    given = _mapping(raw, where)
    _no_extra_keys(given, set(LATENCY_DEFAULTS), where)
    out = {**LATENCY_DEFAULTS, **given}
    for key in ("batch_sizes", "gpu_batch_sizes"):
        sizes = out[key]
        if not isinstance(sizes, list) or not sizes or not all(isinstance(b, int) and b >= 1 for b in sizes):
            raise AttnlabError(f"{where}: {key} must be a non-empty list of positive integers, got {sizes!r}")
    for key, least in (("warmup", 0), ("repeats", 1), ("rounds", 1), ("threads", 1)):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < least:
            raise AttnlabError(f"{where}: {key} must be an integer >= {least}, got {out[key]!r}")
    return out


def _no_extra_keys(d: dict, allowed: set, where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise AttnlabError(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))}; "
                           f"valid keys: {', '.join(sorted(allowed))}")


def _mapping(value, what) -> dict:
    if not isinstance(value, dict):
        raise AttnlabError(f"{what} must be a mapping of dotted keys to values")
    return {str(k): v for k, v in value.items()}


def format_value(value) -> str:
    """A YAML value as the right-hand side of a dotted ``key=value`` override."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def slug(method: str) -> str:
    """A file-name-safe form of a method name: 'ssia+se' -> 'ssia_se'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", method)


def cells(matrix, seeds=None, only=None) -> list[dict]:
    """The matrix's cells in run order, as dicts with method, seed, run_name and the merged overrides."""
    methods = matrix["methods"]
    if only is not None:
        names = [m["name"] for m in methods]
        for name in only:
            if name not in names:
                raise unknown("method", name, names)
        methods = [m for m in methods if m["name"] in only]
    given = seeds is not None  # --seeds: these seeds, for every method that does not list its own
    if not given:  # every seed any method runs, in order of first appearance
        seeds = list(dict.fromkeys([*matrix["seeds"], *(s for m in methods for s in method_seeds(matrix, m))]))
    out = []
    for seed in seeds:  # seed-major: an interrupted matrix has every method at the first seed before the second
        for m in methods:
            if seed not in (m.get("seeds") or (seeds if given else matrix["seeds"])):
                continue
            out.append({"method": m["name"], "seed": seed, "run_name": f"{slug(m['name'])}-s{seed}",
                        "overrides": {**matrix["overrides"], **m["overrides"]}})
    return out


def method_overrides(matrix, method: dict) -> list[str]:
    """Dotted overrides that build one method's config (the matrix's, then the method's own)."""
    return [f"{k}={format_value(v)}" for k, v in {**matrix["overrides"], **method["overrides"]}.items()]


def cell_overrides(matrix, cell, runs_root, device=None) -> list[str]:
    """Dotted overrides for one cell: the matrix's, the method's, then the harness's own (name, seed, out_dir and
    the device when ``--device`` names one)."""
    pairs = [f"{k}={format_value(v)}" for k, v in cell["overrides"].items()]
    pairs += [f"name={cell['run_name']}", f"seed={cell['seed']}", f"out_dir={runs_root}"]
    return pairs + ([f"device={device}"] if device else [])


# Harness settings that say where a cell runs, not what it computes: `attnlab bench --device` may change them.
PLACEMENT_KEYS = ("device",)


def fingerprint(matrix, cell) -> str:
    """What a recorded result depends on, so a changed matrix is not silently mixed with old results."""
    overrides = {k: v for k, v in cell["overrides"].items() if k not in PLACEMENT_KEYS}
    return json.dumps({"recipe": matrix["recipe"], "overrides": overrides}, sort_keys=True, default=str)


def same_settings(recorded: str | None, current: str) -> bool:
    """Whether a recorded fingerprint names the same settings as ``current`` (older records kept the device)."""
    return recorded is None or settings_of(recorded) == current


def settings_of(recorded: str | None) -> str | None:
    """A recorded fingerprint in the form :func:`fingerprint` gives now (None if it is missing or unreadable)."""
    try:
        old = json.loads(recorded)
        for key in PLACEMENT_KEYS:
            old.get("overrides", {}).pop(key, None)
        return json.dumps(old, sort_keys=True, default=str)
    except (json.JSONDecodeError, AttributeError, TypeError):
        return None
