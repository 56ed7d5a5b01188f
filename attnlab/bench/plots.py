"""The report's plots: accuracy against CPU latency and against parameters, validation curves, differences to
the baseline with their intervals (PNG files beside report.md)."""
from pathlib import Path

from ..files import save_figure
from .stats import isnan
from .summary import MatrixSummary, batch_sizes, latency_ms

PLOTS = ("acc_vs_latency.png", "acc_vs_params.png", "val_curves.png", "deltas.png")


def write_plots(summary: MatrixSummary, out_dir) -> list[Path]:
    """The report's four plots (PLOTS): accuracy against CPU latency and against parameters, validation curves, and
    each method's difference to the baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    methods = [m for m in summary.methods if m.n > 0]
    colors = {m.name: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    cpu_sizes = batch_sizes(summary, "cpu")
    bs = cpu_sizes[0] if cpu_sizes else None
    _scatter(plt, out_dir / PLOTS[0], methods, colors, lambda m: latency_ms(m, "cpu", bs) if bs else None,
             f"CPU latency, batch {bs} (ms, median)" if bs else "CPU latency (not measured)",
             f"{summary.matrix}: accuracy vs CPU latency")
    _scatter(plt, out_dir / PLOTS[1], methods, colors, lambda m: m.params / 1e6 if m.params else None,
             "parameters (millions)", f"{summary.matrix}: accuracy vs parameters")
    _plot_curves(plt, out_dir / PLOTS[2], methods, colors, summary.matrix)
    return [out_dir / name for name in PLOTS[:3]] + [_plot_deltas(summary, out_dir / PLOTS[3], plt)]


def _scatter(plt, path, methods, colors, xkey, xlabel, title) -> None:
    """Test top-1 (mean ± SD over seeds) of each method against ``xkey(method)``; methods without it are left out."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    drawn = 0
    for m in methods:
        x = xkey(m)
        if x is None or isnan(x) or isnan(m.test[0]):
            continue
        yerr = 0.0 if isnan(m.test[1]) else m.test[1]
        ax.errorbar([x], [m.test[0]], yerr=[yerr], fmt="o", capsize=3, color=colors[m.name], label=m.name)
        ax.annotate(m.name, (x, m.test[0]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, "plot", dpi=110)
    plt.close(fig)


def _plot_curves(plt, path, methods, colors, matrix_name) -> None:
    """Each method's validation top-1 per epoch, mean over its seeds."""
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    drawn = 0
    for m in methods:
        if m.curve:
            ax.plot(range(1, len(m.curve) + 1), m.curve, marker=".", color=colors[m.name], label=f"{m.name} (n={m.n})")
            drawn += 1
    if drawn:
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no metrics.csv found", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%), mean over seeds")
    ax.set_title(f"{matrix_name}: validation accuracy per epoch")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, "plot", dpi=110)
    plt.close(fig)


def _plot_deltas(summary, path, plt):
    """Each method's test top-1 minus the baseline's, with the Welch (thick) and paired (thin) 95% intervals."""
    rows = [m for m in summary.methods if m.delta_test]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * max(len(rows), 3) + 1.4))
    for k, m in enumerate(rows):
        y = len(rows) - 1 - k
        d, p = m.delta_test, m.paired_test
        if not isnan(d["low"]):
            ax.plot([d["low"], d["high"]], [y, y], color="tab:blue", linewidth=4, alpha=0.5,
                    label="Welch 95%" if k == 0 else None)
        if p and not isnan(p["low"]):
            ax.plot([p["low"], p["high"]], [y - 0.18, y - 0.18], color="tab:orange", linewidth=1.5,
                    label="paired 95%" if k == 0 else None)
        ax.plot([d["diff"]], [y], "o", color="black")
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [m.name for m in reversed(rows)])
    ax.set_xlabel(f"test top-1 minus {summary.baseline} (points)")
    ax.set_title(f"{summary.matrix}: difference to {summary.baseline} (n = seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    if not rows:
        ax.text(0.5, 0.5, "no baseline runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, "plot", dpi=110)
    plt.close(fig)
    return path
