"""Inference latency of each method of a matrix, timed round-robin into ``results/<matrix>/latency.json``."""
import json
import statistics
from pathlib import Path

from ..files import atomic_write_json
from .matrix import method_overrides
from .runs import host_info, one_line


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


def measure_latencies(matrix, methods, latency_path, *, load_config, device=None, log=print) -> dict:
    """Inference latency of each method's model (random weights: latency does not depend on them), once.

    CPU always; CUDA too when the matrix's config would train on a GPU here. Methods are timed round-robin
    (``rounds`` passes over all of them, ``repeats`` timed calls each in total) and the median taken over all of
    a method's calls, so a burst of load from other processes hits every method alike. Entries already in
    latency.json are kept, so re-running measures only what is missing.
    """
    import torch

    from .. import profiler

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
            model, size, want_cuda = latency_model(matrix, m, load_config, device)
        except Exception as err:
            if "error" not in entry:
                entry["error"] = one_line(err)
                changed = True
            log(f"[latency] {m['name']}: skipped ({one_line(err)})")
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
                "name": torch.cuda.get_device_name(0) if device == "cuda" else profiler.cpu_model()}
            changed = True
            log(f"[latency] {name} {device}: "
                + ", ".join(f"bs{bs} {v['median_ms']:.2f} ms" for bs, v in per_bs.items()))
    if changed:
        data["host"] = host_info()
        data["note"] = ("median over repeated forward passes in eval mode under torch.inference_mode, random weights, "
                        f"methods timed round-robin in {rounds} rounds; training-only objectives (ssia) do not "
                        "change the inference model")
        latency_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(latency_path, data, "latency results")
    return data
