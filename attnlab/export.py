"""``attnlab export``: a checkpoint's model as an ONNX inference graph.

The model is rebuilt from the checkpoint's ``config["model"]`` section, its weights (the EMA weights when the run
kept an EMA, as ``attnlab eval`` does; ``--no-ema`` for the raw ones) are loaded with strict=True and it is exported
in eval mode through ``model(x)``, the plain logits path. A run directory stands for its checkpoint_best.pt (else
checkpoint_last.pt), as for every command that opens a trained run (``engine.run_folder.open_run``).
Training-only objectives (SSIA, the SPE regulariser) live outside the model, so the graph is the same whether or not
they were used in training.

Exporter: the TorchScript-based one (``dynamo=False``) by default. It exists on every torch >= 2.4, is fast and
gives dynamic batch and spatial axes; torch >= 2.9 marks it deprecated and defaults to the torch.export-based
exporter (``--exporter dynamo``, needs onnxscript), which we also support. ``--exporter auto`` picks the legacy one
while torch still ships it.
"""
import inspect
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .engine.run_folder import open_run, refuse_overwriting_run, trained_checkpoint
from .errors import AttnlabError, positive_int
from .files import atomic_path, writable_dir

def add_arguments(p):
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint written by attnlab train, or a run directory (its checkpoint_best.pt, else "
                   "checkpoint_last.pt)")
    p.add_argument("--onnx", required=True, metavar="OUT", help="where to write the .onnx file")
    p.add_argument("--input-size", type=positive_int, default=None,
                   help="H = W of the example input (default: data.image_size, else the model's default)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17 legacy, 18 dynamo)")
    p.add_argument("--exporter", choices=("auto", "legacy", "dynamo"), default="auto",
                   help="torch.onnx exporter: legacy = TorchScript-based (dynamo=False); auto = legacy if available")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if the run kept an EMA")
    p.add_argument("--no-check", action="store_true",
                   help="skip comparing onnxruntime's output with torch's on a random input")


def run(args):
    refuse_overwriting_run(args.onnx, trained_checkpoint(args.checkpoint), "--onnx")
    model, cfg = load_checkpoint_model(args.checkpoint, use_ema=not args.no_ema)
    size = args.input_size or input_size_for(cfg)
    out = export_onnx(model, args.onnx, size, opset=args.opset, exporter=args.exporter)
    line = f"exported {cfg['model']['name']} (attention={cfg['model'].get('attention', 'none')}) to {out}"
    if not args.no_check:
        diff = check_onnx(model, out, size)
        line += ("; onnxruntime not installed, output not checked" if diff is None
                 else f"; max |onnxruntime - torch| = {diff:.2e}")
    print(line)
    return 0


def load_checkpoint_model(path, use_ema: bool = True):
    """(model in eval mode with the checkpoint's weights, on the CPU in contiguous memory; its config dict)."""
    run = open_run(path, "cpu", use_ema=use_ema, channels_last=False)
    return run.model, run.config


def input_size_for(cfg: dict) -> int:
    from .models import default_input_size
    size = (cfg.get("data") or {}).get("image_size")
    return int(size) if size else default_input_size(cfg["model"]["name"])


def export_onnx(model, path, input_size: int, opset: int | None = None, exporter: str = "auto", batch_size: int = 1):
    """Export ``model(x)`` (eval mode) to ``path``, written atomically, weights inside the one file. The batch axis
    is dynamic; height and width too with the legacy exporter (the dynamo exporter fixes them at ``input_size``)."""
    if exporter not in ("auto", "legacy", "dynamo"):
        raise AttnlabError(f"unknown exporter '{exporter}'; valid choices: auto, dynamo, legacy")
    has_flag = "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch 2.4 has no flag: legacy only
    if exporter == "auto":
        exporter = "legacy"
    if exporter == "dynamo" and not has_flag:
        raise AttnlabError(f"--exporter dynamo needs torch >= 2.5 (this is {torch.__version__})")
    if opset is None:
        opset = 17 if exporter == "legacy" else 18  # 18: the dynamo exporter's lowest native opset
    low, high = _opsets(exporter)
    if not low <= opset <= high:  # refused here: torch prints the whole traced graph before its own error
        raise AttnlabError(f"--opset {opset}: attnlab exports with the {exporter} exporter of torch "
                           f"{torch.__version__} at opsets {low} to {high}")
    path = Path(path)
    writable_dir(path.parent, "export folder")
    model = model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    with atomic_path(path, "ONNX file") as tmp:
        _export(model, x, tmp, exporter, opset, has_flag)
    return path


def _opsets(exporter: str) -> tuple[int, int]:
    """The opsets this torch's ``exporter`` writes (torch keeps them in a private module: read with fallbacks)."""
    known = getattr(torch.onnx, "_constants", None)
    # The dynamo exporter writes opset 18 and converts down from it, which fails for our graphs (a page of
    # onnxscript traceback, then the opset-18 file anyway): below 18 is refused like any unwritten opset.
    # The legacy exporter lists opsets from 7, but our ResNets' strided slices (the option-A shortcut) need 10.
    low = 18 if exporter == "dynamo" else max(10, getattr(known, "ONNX_MIN_OPSET", 7))
    high = getattr(known, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None) if exporter == "legacy" else None
    return low, high or getattr(known, "ONNX_MAX_OPSET", 20)


def _export(model, x, tmp, exporter: str, opset: int, has_flag: bool) -> None:
    try:
        kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=opset)
        if exporter == "legacy":
            if has_flag:
                kwargs["dynamo"] = False
            kwargs["dynamic_axes"] = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
        else:
            batch = torch.export.Dim("batch", min=1)
            kwargs.update(dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
            if "external_data" in inspect.signature(torch.onnx.export).parameters:
                kwargs["external_data"] = False  # else the weights go to a side file named after the temp file
        with warnings.catch_warnings(), torch.no_grad(), _stdout_silenced():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
            torch.onnx.export(model, (x,), str(tmp), **kwargs)
    except AttnlabError:
        raise
    except OSError:
        raise  # a disk error: atomic_path names the destination
    except Exception as err:
        other = "dynamo" if exporter == "legacy" else "legacy"
        hint = f"; try --exporter {other}" if has_flag else ""  # torch 2.4 has the legacy exporter only
        raise AttnlabError(f"ONNX export with the {exporter} exporter failed: {_first_words(err)}{hint}") from None


def _first_words(err: Exception, limit: int = 300) -> str:
    """The gist of an exporter's error: its first line, without the traced graph it quotes, at most ``limit``
    characters."""
    text = (str(err).splitlines() or [repr(err)])[0].split("  [Caused by")[0]
    return text if len(text) <= limit else text[:limit] + "..."


@contextmanager
def _stdout_silenced():
    """File descriptor 1 sent to /dev/null: a failing legacy export prints the whole traced graph (hundreds of lines)
    to stdout from C++, where Python's redirects do not reach."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to silence (fd 1 closed): nothing can be printed there anyway
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(devnull)
    finally:
        os.close(saved)


def check_onnx(model, path, input_size: int, batch_size: int = 2, seed: int = 0):
    """Max |onnxruntime - torch| on a random input, or None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=g)
    device = next(model.parameters()).device
    with torch.no_grad():
        ref = model.eval()(x.to(device)).float().cpu()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(out) - ref).abs().max())
