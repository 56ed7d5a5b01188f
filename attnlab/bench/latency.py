"""Inference latency of each method of a matrix, timed round-robin into ``results/<matrix>/latency.json``."""
import json
import statistics
from pathlib import Path

from ..errors import AttnlabError
from ..files import atomic_write_json, held_lock
from .matrix import method_overrides
from ..host import cpu_model, cpu_threads, host_info, timing_machine
from ..measure import measure_latency
from .runs import one_line


def latency_model(matrix, method, load_config, device=None):
    """(model in eval mode, input size, whether CUDA applies) for one method, as its training cells build it."""
    import torch

    from ..engine.checkpoint import model_from_config
    from ..models import default_input_size

    cfg = load_config(matrix["recipe_path"], overrides=method_overrides(matrix, method))
    mc = cfg.model
    model = model_from_config(mc)
    want_cuda = torch.cuda.is_available() and str(device or cfg.get("device", "auto")) in ("auto", "cuda")
    return model.eval(), default_input_size(mc.name), want_cuda


def read_latency(path) -> dict:
    """latency.json as a dict ({} when there is none yet); a file that is not a JSON object of 'methods' (a
    conflict left in it, say) is a one-line error."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AttnlabError(f"{path} is not readable JSON ({one_line(err)}); fix it, or delete it to time every "
                           "method again") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods", {}), dict):
        raise AttnlabError(f"{path} should hold a JSON object with a 'methods' mapping; fix it, or delete it to time "
                           "every method again")
    return data


def time_matrix(matrix, results_dir, only=None, device=None, log=print) -> dict:
    """The latency step of ``attnlab bench`` (and all of ``--latency-only``): the matrix's methods (those in
    ``only``) missing from results_dir/latency.json are timed."""
    from ..engine.config import load_config
    methods = [m for m in matrix["methods"] if only is None or m["name"] in only]
    return measure_latencies(matrix, methods, Path(results_dir) / "latency.json", load_config=load_config,
                             device=device, log=log)


def measure_latencies(matrix, methods, latency_path, *, load_config, device=None, log=print) -> dict:
    """Inference latency of each method's model (random weights: latency does not depend on them), once.

    CPU always; CUDA too when the matrix's config would train on a GPU here. Methods are timed round-robin
    (``rounds`` passes over all of them, ``repeats`` timed calls each in total) and the median taken over all of
    a method's calls, so a burst of load from other processes hits every method alike. CPU timings use the
    matrix's ``latency.threads`` torch threads (default 1), whatever threads the bench trains with. Entries
    already in latency.json are kept, so re-running measures only what is missing. But latencies compare only
    when timed on one machine: when anything is timed here on a device, every other method of the matrix whose
    entry for that device came from another machine (or does not say which) is timed again beside it.
    """
    import torch

    latency_path = Path(latency_path)
    data = read_latency(latency_path)
    data.setdefault("methods", {})
    settings = matrix["latency"]
    changed = set()  # (method, "cpu" | "cuda" | "error"): the entries this call wrote
    built = {}  # method name -> (model, size, want_cuda), or None when it cannot be built

    def build(m):
        if m["name"] not in built:
            entry = data["methods"].setdefault(m["name"], {})
            try:
                built[m["name"]] = latency_model(matrix, m, load_config, device)
            except Exception as err:
                built[m["name"]] = None
                if "error" not in entry:
                    entry["error"] = one_line(err)
                    changed.add((m["name"], "error"))
                log(f"[latency] {m['name']}: skipped ({one_line(err)})")
        return built[m["name"]]

    jobs = {}  # device -> [method names]
    for m in methods:
        if (got := build(m)) is not None:
            for dev in ("cpu", "cuda") if got[2] else ("cpu",):
                if dev not in data["methods"][m["name"]]:
                    jobs.setdefault(dev, []).append(m["name"])
    for dev, names in jobs.items():
        with cpu_threads(int(settings["threads"]) if dev == "cpu" else None):
            here = timing_machine(dev)
            stale = [m for m in matrix["methods"] if m["name"] not in names
                     and _timed_elsewhere(data["methods"].get(m["name"], {}), dev, here) and build(m) is not None]
            if stale:
                log(f"[latency] {', '.join(m['name'] for m in stale)} {dev}: timed on another machine or before "
                    "per-round medians were kept, timed again "
                    f"beside {', '.join(names)} ({here})")
                names += [m["name"] for m in stale]
            batch_sizes = settings["batch_sizes"] if dev == "cpu" else settings["gpu_batch_sizes"]
            timed = _time_round_robin({n: built[n][:2] for n in names}, dev, batch_sizes, settings)
            for name, per_bs in timed.items():
                data["methods"][name][dev] = {
                    "batch": per_bs, "input_size": built[name][1], "machine": here,
                    "threads": torch.get_num_threads() if dev == "cpu" else None,
                    "name": torch.cuda.get_device_name(0) if dev == "cuda" else cpu_model()}
                changed.add((name, dev))
                log(f"[latency] {name} {dev}: "
                    + ", ".join(f"bs{bs} {v['median_ms']:.2f} ms" for bs, v in per_bs.items()))
    if changed:
        data = _save(latency_path, {(n, k): data["methods"][n][k] for n, k in changed}, settings)
    return data


def _save(latency_path: Path, entries: dict, settings) -> dict:
    """Write this call's ``entries`` ({(method, "cpu" | "cuda" | "error"): value}) into latency.json as it is now:
    another bench on the matrix may have written its own entries since this one read the file, and they are kept
    (a timing this call did not take is never overwritten by the copy it read)."""
    with held_lock(latency_path, "latency results"):
        data = read_latency(latency_path)
        data.setdefault("methods", {})
        for (name, key), value in entries.items():
            entry = data["methods"].setdefault(name, {})
            if key != "error":
                entry[key] = value
                entry.pop("error", None)  # timed now: an earlier failure to build it (since fixed) is history
            else:
                entry.setdefault("error", value)
        data["host"] = host_info()
        data["note"] = ("median over repeated forward passes in eval mode under torch.inference_mode, random weights, "
                        f"methods timed round-robin in {_rounds(settings)} rounds; training-only objectives (ssia) "
                        "do not change the inference model")
        atomic_write_json(latency_path, data, "latency results")
    return data


def _timed_elsewhere(entry: dict, device: str, here: str) -> bool:
    """Whether a method's latency.json entry holds a timing for ``device`` from another machine than ``here`` (an
    entry from before machines were recorded counts as another), or one without per-round medians (timed before
    they were kept: a ratio to it has no interval)."""
    if device not in entry:
        return False
    kept_rounds = all("round_medians_ms" in v for v in entry[device].get("batch", {}).values())
    return entry[device].get("machine") != here or not kept_rounds


def _rounds(settings) -> int:
    return max(1, int(settings.get("rounds", 5)))


def _time_round_robin(models, device, batch_sizes, settings) -> dict:
    """{name: {batch size: {median_ms, images_per_s, n}}} for ``models`` ({name: (model, input size)}), timed in
    rounds that each pass over every model, so load from other processes hits them alike."""
    import torch

    rounds = _rounds(settings)
    per_round = max(1, -(-int(settings["repeats"]) // rounds))
    times = {(name, bs): [] for name in models for bs in batch_sizes}
    round_medians = {(name, bs): [] for name in models for bs in batch_sizes}
    with torch.no_grad():
        for r in range(rounds):
            for name, (model, size) in models.items():
                model.to(device)
                for bs in batch_sizes:
                    out = measure_latency(model, size, bs, device=device,
                                                   warmup=settings["warmup"] if r == 0 else 1, repeats=per_round)
                    times[(name, bs)].extend(out["times_ms"])
                    round_medians[(name, bs)].append(statistics.median(out["times_ms"]))
                model.to("cpu")
    out = {}
    for name in models:
        out[name] = {}
        for bs in batch_sizes:
            med = statistics.median(times[(name, bs)])
            # Per-round medians, paired by round across methods: what a latency ratio's interval is built from.
            out[name][str(bs)] = {"median_ms": med, "images_per_s": bs / (med / 1e3), "n": len(times[(name, bs)]),
                                  "round_medians_ms": round_medians[(name, bs)]}
    return out
