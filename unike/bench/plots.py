"""Plots of a `results.json` (matplotlib, imported lazily): a bar chart per metric (one-step runs), the
metrics against K (sequential runs), α against the best match (the relevance gate), and the
seconds of each edit along the latency sequence."""
from __future__ import annotations

from pathlib import Path

from ..metrics import METRICS
from .methods import GROUPS
from .report import HEAD, name_of


def pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install matplotlib (or unike[dev]), or pass --no-plots") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Lay out, write (90 dpi) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path


def order(method: str) -> tuple:
    """The registry's order: main methods, ablations, ζ, then fixed α by value."""
    known = GROUPS["all"]
    return (known.index(method), "") if method in known else (len(known), method)


def bar_charts(runs: list[dict], folder: Path) -> list[Path]:
    """One chart per metric: one-step scores per method, a panel per (task, protocol, model, n, seed)."""
    plt = pyplot()
    rs = [r for r in runs if r["mode"] == "one-step"]
    if not rs:
        return []
    group = lambda r: (r["task"], r["protocol"], r["model"], r["n"], r["seed"])  # noqa: E731
    groups = list(dict.fromkeys(group(r) for r in rs))
    widest = max(sum(group(r) == g for r in rs) for g in groups)
    out = []
    for metric in [m for m in METRICS if any(m in r["scores"] for r in rs)]:
        fig, axes = plt.subplots(len(groups), 1, figsize=(max(5, 0.5 * widest + 2), 2.8 * len(groups)), squeeze=False)
        for ax, g in zip(axes[:, 0], groups):
            mine = sorted((r for r in rs if group(r) == g), key=lambda r: order(r["method"]))
            ax.bar(range(len(mine)), [r["scores"].get(metric, float("nan")) for r in mine],
                   color=["tab:red" if r["method"] == "unike" else "tab:blue" for r in mine])
            ax.set_xticks(range(len(mine)), [name_of(r["method"]).replace("*", "") for r in mine], rotation=30,
                          ha="right", fontsize=7)
            ax.set_ylim(0, 105)
            ax.set_ylabel(f"{HEAD[metric]} (%)", fontsize=8)
            ax.set_title(f"{g[0]} ({g[2]}, {g[1]}, n={g[3]}, seed {g[4]})", fontsize=8)
        fig.suptitle(f"{HEAD[metric]}, one-step editing", fontsize=9)
        out.append(save(fig, folder / f"bar_{metric}.png"))
    return out


def k_curves(runs: list[dict], folder: Path) -> list[Path]:
    """Per task: each metric against K, a panel per method with sequential runs at two or more K."""
    plt = pyplot()
    out = []
    for task in dict.fromkeys(r["task"] for r in runs if r["mode"] == "sequential"):
        rs = [r for r in runs if r["mode"] == "sequential" and r["task"] == task]
        methods = [m for m in dict.fromkeys(r["method"] for r in rs)
                   if len({r["k"] for r in rs if r["method"] == m}) > 1]
        if not methods:
            continue
        fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.6), squeeze=False)
        for ax, m in zip(axes[0], methods):
            mine = sorted((r for r in rs if r["method"] == m), key=lambda r: r["k"])
            ks = [r["k"] for r in mine]
            for metric in [m for m in METRICS if any(m in r["scores"] for r in mine)]:
                style = "--" if metric in ("ci_loc", "ri_loc") else "-"
                ax.plot(ks, [r["scores"].get(metric, float("nan")) for r in mine], style, marker="o",
                        label=HEAD[metric])
            ax.set_xscale("log")
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlabel("K (edits before scoring)")
            ax.set_ylim(0, 105)
            ax.set_title(f"{name_of(m).replace('*', '')}, {task}")
        axes[0][0].set_ylabel("score (%)")
        axes[0][-1].legend(fontsize=7, loc="lower left")
        out.append(save(fig, folder / f"sequential_{task}.png"))
    return out


def alpha_plot(records: list[dict], folder: Path) -> list[Path]:
    """α against the best match (the relevance gate's quantity), relevant and unrelated probes, a panel
    per (task, layer), with the layer's relevance gate."""
    plt = pyplot()
    if not records:
        return []
    layers = sorted({p["layer"] for rec in records for p in rec["points"]})
    fig, axes = plt.subplots(len(records), len(layers), figsize=(3.6 * len(layers), 3.2 * len(records)),
                             squeeze=False, sharey=True)
    for row, rec in zip(axes, records):
        for ax, layer in zip(row, layers):
            for relevant, colour, label in ((True, "tab:blue", "about the edit (rel, t_gen, m_gen)"),
                                            (False, "tab:red", "unrelated (t_loc, m_loc, ci_loc, ri_loc)")):
                pts = [p for p in rec["points"] if p["relevant"] == relevant and p["layer"] == layer]
                ax.scatter([p["cosine"] for p in pts], [p["alpha"] for p in pts], s=9, alpha=0.5, c=colour,
                           label=label)
            if str(layer) in rec["gate"]:
                ax.axvline(rec["gate"][str(layer)], color="grey", lw=0.8, ls=":")
            ax.set_title(f"{rec['task']}, layer {layer}", fontsize=9)
            ax.set_xlabel("best match (relevance)", fontsize=8)
        row[0].set_ylabel("α at the question-final token", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"α against relevance after one edit ({records[0]['model']}); dotted: the relevance gate", fontsize=9)
    return [save(fig, folder / "alpha_relevance.png")]


def latency_plot(speed: dict, folder: Path) -> list[Path]:
    """Seconds of each edit along the latency sequence (`--speed`)."""
    lat = speed.get("latency")
    if not lat or not lat.get("seconds"):
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(range(1, len(lat["seconds"]) + 1), lat["seconds"], lw=0.8)
    ax.set_xlabel("edit number in one sequence")
    ax.set_ylabel("seconds")
    ax.set_title(f"edit latency, {lat['edit_steps']} steps per edit ({lat['model']})")
    return [save(fig, folder / "latency.png")]


def plots(results: dict, folder) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs = results.get("runs", [])
    return (bar_charts(runs, folder) + k_curves(runs, folder) + alpha_plot(results.get("alpha", []), folder)
            + latency_plot(results.get("speed", {}), folder))
