"""PNG figures of benchmark results (matplotlib, Agg backend): grouped bars and per-op line panels."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

YLABELS = {"median_ms": "forward + backward, median ms", "peak_MiB": "peak extra memory, MiB"}


def _subplots(rows: int, columns: int, figsize: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(rows, columns, figsize=figsize, squeeze=False)


def _save(plt, fig, path, title: str, dpi: int) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_grouped_bars(path: Path, groups: list[str], panels: list[tuple[str, dict[str, list[float]]]],
                      title: str = "") -> Path:
    """One bar panel per ``(ylabel, {series: one value per group})``, bars grouped by ``groups``."""
    plt, fig, axes = _subplots(1, len(panels), (1.6 * len(groups) * len(panels) + 2, 4))
    for ax, (ylabel, series) in zip(axes[0], panels):
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
        ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    return _save(plt, fig, path, title, dpi=120)


def bars_per_problem(group: Callable[[dict], str], keys: list[str]) -> Callable[[list[dict], Path], Path]:
    """A ``plot(records, path)`` of :func:`save_grouped_bars`: one panel per record key of ``keys``,
    bars grouped by ``group(record)``, one series per ``record["variant"]``."""
    def plot(records: list[dict], path: Path) -> Path:
        groups = list(dict.fromkeys(group(r) for r in records))
        panels = []
        for key in keys:
            values: dict[str, dict] = {}
            for r in records:
                values.setdefault(r["variant"], {})[group(r)] = r[key]
            panels.append((YLABELS[key], {variant: [v[g] for g in groups] for variant, v in values.items()}))
        return save_grouped_bars(path, groups, panels)

    return plot


def save_lines_per_op(path: Path, rows: list[dict], panels: list[tuple[str, str]], title: str = "") -> Path:
    """One column per ``row["op"]``, one row per ``(key, ylabel)`` panel: ``row[key]`` (log scale, when
    a number) against ``row["problem"]`` in benchmark order, one line per ``row["variant"]``."""
    ops = list(dict.fromkeys(row["op"] for row in rows))
    plt, fig, axes = _subplots(len(panels), len(ops), (4.2 * len(ops), 3.2 * len(panels)))
    for column, op in enumerate(ops):
        op_rows = [row for row in rows if row["op"] == op]
        cases = list(dict.fromkeys(row["problem"] for row in op_rows))
        for line, (key, ylabel) in enumerate(panels):
            ax = axes[line][column]
            plotted = False
            for variant in dict.fromkeys(row["variant"] for row in op_rows):
                points = [(cases.index(row["problem"]), row[key]) for row in op_rows
                          if row["variant"] == variant and isinstance(row.get(key), (int, float))]
                if points:
                    ax.plot(*zip(*points), marker="o", label=variant)
                    plotted = True
            ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize="x-small")
            if plotted:
                ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, f"{key}: not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylabel(ylabel)
            if line == 0:
                ax.set_title(op)
            if line == 0 and plotted:
                ax.legend(fontsize="x-small")
    return _save(plt, fig, path, title, dpi=110)
