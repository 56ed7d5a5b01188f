"""``attnlab bench``: run a benchmark matrix (methods x seeds) through the training engine.

A matrix YAML names a base recipe, overrides shared by every cell, a list of methods (each a name plus its own
overrides) and seeds:

    name: cpu_proxy                    # results/<name>/ and runs/<name>/ (default: the file's stem)
    recipe: configs/quick.yaml         # a configs/*.yaml path, or null for the engine's defaults
    overrides: {model.name: resnet20, train.epochs: 4}
    methods:
      - {name: none, overrides: {model.attention: none}}
      - {name: ssia+se, overrides: {model.attention: se, ssia.enabled: true}}
    seeds: [0, 1, 2]
    latency: {batch_sizes: [1, 32], warmup: 5, repeats: 20}

Each cell trains in-process into ``runs/<matrix>/<method>-s<seed>/`` and appends one JSON line to
``results/<matrix>/runs.jsonl``. A cell whose line is already there is skipped, so an interrupted matrix resumes
where it stopped; a cell that raises is recorded as failed with its one-line error and the matrix goes on.
Inference latency is measured once per method into ``results/<matrix>/latency.json``.
"""
import csv
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .errors import AttnlabError

MATRIX_KEYS = {"name", "description", "recipe", "overrides", "methods", "seeds", "latency"}
METHOD_KEYS = {"name", "overrides"}
LATENCY_DEFAULTS = {"batch_sizes": [1, 32], "gpu_batch_sizes": [1, 256], "warmup": 5, "repeats": 20, "rounds": 5}


# ----------------------------------------------------------------------------------------------- matrix file
def load_matrix(path) -> dict:
    """Read and check a matrix YAML; returns a dict with name, recipe, overrides, methods, seeds, latency."""
    path = Path(path)
    if not path.is_file():
        raise AttnlabError(f"matrix file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AttnlabError(f"matrix {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise AttnlabError(f"matrix {path} must be a mapping with 'methods' and 'seeds'")
    extra = set(raw) - MATRIX_KEYS
    if extra:
        raise AttnlabError(f"matrix {path}: unknown key(s) {', '.join(sorted(extra))}; "
                           f"valid keys: {', '.join(sorted(MATRIX_KEYS))}")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise AttnlabError(f"matrix name '{name}' may hold only letters, digits, '.', '_' and '-'")
    recipe = raw.get("recipe")
    recipe_path = None
    if recipe is not None:
        # Relative to the working directory, else to a folder above the matrix file (the repository root).
        candidates = [Path(recipe)] + [p / recipe for p in path.resolve().parents]
        recipe_path = next((str(c) for c in candidates if c.is_file()), None)
        if recipe_path is None:
            raise AttnlabError(f"matrix {path}: recipe '{recipe}' not found")
    overrides = _mapping(raw.get("overrides") or {}, f"matrix {path}: 'overrides'")
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise AttnlabError(f"matrix {path}: 'methods' must be a non-empty list of {{name, overrides}}")
    out_methods, seen = [], set()
    for i, m in enumerate(methods):
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, dict) or "name" not in m:
            raise AttnlabError(f"matrix {path}: method #{i + 1} needs a 'name'")
        extra = set(m) - METHOD_KEYS
        if extra:
            raise AttnlabError(f"matrix {path}: method '{m['name']}' has unknown key(s) {', '.join(sorted(extra))}")
        mname = str(m["name"])
        if mname in seen:
            raise AttnlabError(f"matrix {path}: method '{mname}' listed twice")
        seen.add(mname)
        out_methods.append({"name": mname,
                            "overrides": _mapping(m.get("overrides") or {}, f"method '{mname}' overrides")})
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise AttnlabError(f"matrix {path}: 'seeds' must be a non-empty list of integers")
    latency = dict(LATENCY_DEFAULTS)
    latency.update(_mapping(raw.get("latency") or {}, f"matrix {path}: 'latency'"))
    return {"name": name, "path": str(path), "description": raw.get("description", ""), "recipe": recipe,
            "recipe_path": recipe_path,
            "overrides": overrides, "methods": out_methods, "seeds": list(seeds), "latency": latency}


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
    seeds = matrix["seeds"] if seeds is None else seeds
    methods = matrix["methods"]
    if only is not None:
        names = [m["name"] for m in methods]
        for name in only:
            if name not in names:
                from .errors import unknown
                raise unknown("method", name, names)
        methods = [m for m in methods if m["name"] in only]
    out = []
    for seed in seeds:  # seed-major: an interrupted matrix has every method at the first seed before the second
        for m in methods:
            out.append({"method": m["name"], "seed": seed, "run_name": f"{slug(m['name'])}-s{seed}",
                        "overrides": {**matrix["overrides"], **m["overrides"]}})
    return out


def cell_overrides(matrix, cell, runs_root) -> list[str]:
    """Dotted overrides for one cell: the matrix's, the method's, then the harness's own (name, seed, out_dir)."""
    pairs = [f"{k}={format_value(v)}" for k, v in cell["overrides"].items()]
    pairs += [f"name={cell['run_name']}", f"seed={cell['seed']}", f"out_dir={runs_root}"]
    return pairs


def fingerprint(matrix, cell) -> str:
    """What a recorded result depends on, so a changed matrix is not silently mixed with old results."""
    return json.dumps({"recipe": matrix["recipe"], "overrides": cell["overrides"]}, sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------- runs.jsonl
def read_runs(path) -> list[dict]:
    """Every line of a runs.jsonl. A line torn by a process killed mid-write is skipped with a warning (its cell
    counts as not run, so it runs again)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"attnlab: warning: {path} line {i + 1} is not valid JSON (a torn write?); ignored",
                  file=sys.stderr)
    return out


def append_line(path, record: dict) -> None:
    """Append one JSON line and fsync it: a crash leaves at most a torn last line, which read_runs skips."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record, sort_keys=False, default=_json_default)
    # A torn previous line (killed mid-write) must not swallow this one: start on a fresh line.
    prefix = ""
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                prefix = "\n"
    with open(path, "a") as f:
        f.write(prefix + data + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def latest_by_cell(records) -> dict:
    """{(method, seed): the last line recorded for that cell}."""
    out = {}
    for r in records:
        out[(r.get("method"), r.get("seed"))] = r
    return out


# ----------------------------------------------------------------------------------------------- host info
def host_info() -> dict:
    import torch
    info = {"platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    import subprocess
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def read_curve(run_dir) -> list[float] | None:
    """val_top1 per epoch from a run's metrics.csv (None when there is none)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    curve = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                curve.append(float(row["val_top1"]))
            except (KeyError, TypeError, ValueError):
                curve.append(float("nan"))
    return curve


# ----------------------------------------------------------------------------------------------- running
def run_cell(matrix, cell, runs_root, *, load_config, train) -> dict:
    """Train one cell in-process and return its runs.jsonl record (status 'ok' or 'failed')."""
    run_dir = Path(runs_root) / cell["run_name"]
    record = {"matrix": matrix["name"], "matrix_file": matrix["path"], "method": cell["method"], "seed": cell["seed"],
              "run_dir": str(run_dir), "overrides": cell["overrides"], "recipe": matrix["recipe"],
              "fingerprint": fingerprint(matrix, cell)}
    start = time.time()
    try:
        cfg = load_config(matrix["recipe_path"], overrides=cell_overrides(matrix, cell, runs_root))
        results = train(cfg, resume=_prepare_run_dir(run_dir, record["fingerprint"]))
    except Exception as err:  # one bad cell must not stop the matrix: record it and move on
        record.update(status="failed", error=_one_line(err), wall_time_s=round(time.time() - start, 2))
        return record
    results = dict(results or {})
    record.update(
        status="ok",
        val_top1=results.get("best_val_top1"),
        val_top5=results.get("best_val_top5"),
        test_top1=results.get("test_top1"),
        test_top5=results.get("test_top5"),
        params=results.get("params"),
        flops=results.get("flops"),
        train_images_per_s=results.get("train_images_per_s"),
        wall_time_s=results.get("wall_time_s", round(time.time() - start, 2)),
        device=results.get("device"),
        git_commit=results.get("git_commit"),
        epochs=_get(cfg, "train.epochs"),
        val_curve=read_curve(run_dir),
    )
    return record


def _prepare_run_dir(run_dir: Path, fp: str):
    """The run dir to resume from (this cell was interrupted mid-training), or None after clearing a stale one.

    The harness owns runs/<matrix>/<cell>/: bench_cell.json records the settings the run was started with, so only
    a run of the same settings is continued; anything else there is removed so metrics.csv and TensorBoard start
    clean.
    """
    import shutil
    marker = run_dir / "bench_cell.json"
    if (run_dir / "checkpoint_last.pt").is_file() and marker.is_file():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == fp:
                return run_dir
        except (OSError, json.JSONDecodeError):
            pass
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    marker.write_text(json.dumps({"fingerprint": fp}) + "\n")
    return None


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return None
    return node


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _latency_model(matrix, method, load_config):
    """(model in eval mode, input size, whether CUDA applies) for one method, as its training cells build it."""
    import torch

    from .models import create_model, default_input_size

    cfg = load_config(matrix["recipe_path"], overrides=[f"{k}={format_value(v)}" for k, v in
                                                      {**matrix["overrides"], **method["overrides"]}.items()])
    mc = cfg.model
    kwargs = dict(mc.attention_kwargs) if mc.get("attention_kwargs") else None
    blocks = mc.get("blocks")
    blocks = list(blocks) if blocks is not None and not isinstance(blocks, str) else blocks
    model = create_model(mc.name, num_classes=mc.get("num_classes"), attention=mc.attention,
                         attention_kwargs=kwargs, blocks=blocks, share=mc.get("share"))
    want_cuda = torch.cuda.is_available() and str(cfg.get("device", "auto")) in ("auto", "cuda")
    return model.eval(), default_input_size(mc.name), want_cuda


def measure_latencies(matrix, methods, latency_path, *, load_config, log=print) -> dict:
    """Inference latency of each method's model (random weights: latency does not depend on them), once.

    CPU always; CUDA too when the matrix's config would train on a GPU here. Methods are timed round-robin
    (``rounds`` passes over all of them, ``repeats`` timed calls each in total) and the median taken over all of
    a method's calls, so a burst of load from other processes hits every method alike. Entries already in
    latency.json are kept, so re-running measures only what is missing.
    """
    import torch

    from . import profiler

    latency_path = Path(latency_path)
    data = json.loads(latency_path.read_text()) if latency_path.is_file() else {}
    data.setdefault("methods", {})
    settings = matrix["latency"]
    rounds = max(1, int(settings.get("rounds", 5)))
    per_round = max(1, -(-int(settings["repeats"]) // rounds))
    changed = False
    jobs = {}  # device -> [(name, model, size)]
    for m in methods:
        entry = data["methods"].setdefault(m["name"], {})
        try:
            model, size, want_cuda = _latency_model(matrix, m, load_config)
        except Exception as err:
            if "error" not in entry:
                entry["error"] = _one_line(err)
                changed = True
            log(f"[latency] {m['name']}: skipped ({_one_line(err)})")
            continue
        for device in ("cpu", "cuda") if want_cuda else ("cpu",):
            if device not in entry:
                jobs.setdefault(device, []).append((m["name"], model, size))

    for device, todo in jobs.items():
        batch_sizes = settings["batch_sizes"] if device == "cpu" else settings["gpu_batch_sizes"]
        times = {(name, bs): [] for name, _, _ in todo for bs in batch_sizes}
        with torch.no_grad():
            for r in range(rounds):
                for name, model, size in todo:
                    model.to(device)
                    for bs in batch_sizes:
                        out = profiler.measure_latency(model, size, bs, device=device,
                                                       warmup=settings["warmup"] if r == 0 else 1, repeats=per_round)
                        times[(name, bs)].extend(out["times_ms"])
                    model.to("cpu")
        for name, _, size in todo:
            per_bs = {}
            for bs in batch_sizes:
                med = statistics.median(times[(name, bs)])
                per_bs[str(bs)] = {"median_ms": med, "images_per_s": bs / (med / 1e3), "n": len(times[(name, bs)])}
            data["methods"][name][device] = {
                "batch": per_bs, "input_size": size, "threads": torch.get_num_threads() if device == "cpu" else None,
                "name": torch.cuda.get_device_name(0) if device == "cuda" else _cpu_name()}
            changed = True
            log(f"[latency] {name} {device}: "
                + ", ".join(f"bs{bs} {v['median_ms']:.2f} ms" for bs, v in per_bs.items()))
    if changed:
        data["host"] = host_info()
        data["note"] = ("median over repeated forward passes in eval mode under torch.inference_mode, random weights, "
                        f"methods timed round-robin in {rounds} rounds; training-only objectives (ssia) do not "
                        "change the inference model")
        tmp = latency_path.with_suffix(".json.tmp")
        latency_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, latency_path)
    return data


def _config_checker():
    """For --dry-run: a function (recipe, overrides) -> one-line problem or None, via the engine's config loader
    (which rejects unknown keys and bad values). Without the engine installed, nothing is checked."""
    try:
        from .engine.config import load_config
    except ModuleNotFoundError:
        return lambda recipe, overrides: None

    def check(recipe, overrides):
        try:
            cfg = load_config(recipe, overrides=overrides)
            from .attention import get
            get(cfg.model.attention)  # an unknown attention is only caught when the model is built otherwise
        except Exception as err:
            return _one_line(err)
        return None
    return check


def run_matrix(matrix, *, seeds=None, only=None, dry_run=False, results_root="results", runs_root="runs",
               latency=True, retry_failed=False, log=print) -> dict:
    """Run every unfinished cell of ``matrix``; returns counts {'total', 'skipped', 'ok', 'failed'}."""
    results_dir = Path(results_root) / matrix["name"]
    runs_dir = Path(runs_root) / matrix["name"]
    runs_path = results_dir / "runs.jsonl"
    todo = cells(matrix, seeds, only)
    done = latest_by_cell(read_runs(runs_path))

    pending = []
    for c in todo:
        prev = done.get((c["method"], c["seed"]))
        if prev is not None and prev.get("fingerprint") not in (None, fingerprint(matrix, c)):
            raise AttnlabError(
                f"{runs_path} holds method '{c['method']}' seed {c['seed']} run with other settings than "
                f"{matrix['path']} now gives; move that file away (or rename the matrix) before re-running")
        finished = prev is not None and (prev.get("status") == "ok" or not retry_failed)
        pending.append((c, prev if finished else None))
    n_total = len(pending)
    n_skip = sum(1 for _, prev in pending if prev is not None)

    if dry_run:
        log(f"matrix {matrix['name']}: {n_total} cells ({n_skip} finished), recipe {matrix['recipe']}, "
            f"results -> {runs_path}")
        check = _config_checker()
        bad = 0
        for i, (c, prev) in enumerate(pending, 1):
            state = f"done ({prev.get('status')})" if prev else "to run"
            overrides = cell_overrides(matrix, c, runs_dir)
            problem = check(matrix["recipe_path"], overrides) if prev is None else None
            bad += problem is not None
            log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: {state}; overrides: {' '.join(overrides)}"
                + (f"; CONFIG ERROR: {problem}" if problem else ""))
        return {"total": n_total, "skipped": n_skip, "ok": 0, "failed": 0, "config_errors": bad}

    import torch

    from .engine.config import load_config
    from .engine.train import train

    if latency:
        methods = [m for m in matrix["methods"] if only is None or m["name"] in only]
        measure_latencies(matrix, methods, results_dir / "latency.json", load_config=load_config, log=log)

    counts = {"total": n_total, "skipped": n_skip, "ok": 0, "failed": 0}
    host = host_info()
    commit = _git_commit()
    durations = []
    n_left = n_total - n_skip
    for i, (c, prev) in enumerate(pending, 1):
        if prev is not None:
            log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: finished earlier ({prev.get('status')}), skipped")
            continue
        eta = ""
        if durations:
            eta = f", ETA {_fmt_duration(sum(durations) / len(durations) * n_left)}"
        log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: running ({n_left} left{eta})")
        t0 = time.time()
        record = run_cell(matrix, c, runs_dir, load_config=load_config, train=train)
        durations.append(time.time() - t0)
        n_left -= 1
        record.update(threads=torch.get_num_threads(), host=host, harness_commit=commit,
                      finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        append_line(runs_path, record)
        counts[record["status"]] += 1
        if record["status"] == "ok":
            log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: val top-1 {_pct(record['val_top1'])}, "
                f"test top-1 {_pct(record['test_top1'])} in {_fmt_duration(durations[-1])}")
        else:
            log(f"[{i}/{n_total}] {c['method']} seed {c['seed']}: FAILED: {record['error']}")
    log(f"matrix {matrix['name']}: {counts['ok']} ran, {counts['failed']} failed, {counts['skipped']} skipped; "
        f"results in {runs_path}")
    return counts


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.2f}"


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p):
    p.add_argument("--matrix", required=True, help="matrix YAML, e.g. benchmarks/matrices/cpu_proxy.yaml")
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds (default: the matrix's)")
    p.add_argument("--only", type=_str_list, default=None, help="comma-separated method names to run")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their overrides, run nothing")
    p.add_argument("--results-root", default="results", help="where results/<matrix>/ goes (default: results)")
    p.add_argument("--runs-root", default="runs", help="where runs/<matrix>/<run>/ goes (default: runs)")
    p.add_argument("--no-latency", action="store_true", help="skip the per-method latency measurement")
    p.add_argument("--latency-only", action="store_true",
                   help="measure the missing latency.json entries and train nothing (delete the file to re-measure)")
    p.add_argument("--retry-failed", action="store_true", help="run cells recorded as failed again")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for training and latency (default: torch's; 1 is much faster than "
                        "2 on a CPU shared with other busy processes)")


def _int_list(text):
    import argparse
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got '{text}'") from None


def _str_list(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def run(args):
    matrix = load_matrix(args.matrix)
    from .profiler import set_threads
    set_threads(args.threads)
    if args.latency_only:
        from .engine.config import load_config
        methods = [m for m in matrix["methods"] if args.only is None or m["name"] in args.only]
        measure_latencies(matrix, methods, Path(args.results_root) / matrix["name"] / "latency.json",
                          load_config=load_config, log=lambda s: print(s, flush=True))
        return 0
    counts = run_matrix(matrix, seeds=args.seeds, only=args.only, dry_run=args.dry_run,
                        results_root=args.results_root, runs_root=args.runs_root, latency=not args.no_latency,
                        retry_failed=args.retry_failed, log=lambda s: print(s, flush=True))
    sys.stdout.flush()
    return 1 if counts["failed"] or counts.get("config_errors") else 0
