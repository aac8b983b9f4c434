"""The comparison plot (matplotlib, Agg backend): accuracy against cost, with the Pareto front.

Draws a `comparison_rows.Comparison` built by `compare.build_comparison`; needs the `plot` extra (`pip install 'fastv_advanced[plot]'`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .comparison_rows import Comparison, Row, pareto_front

# Colours in the order the rows' groups first appear (the guide's FastV rules come first: max_head red,
# avg_all_heads blue, weighted_combination green, random grey).
GROUP_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#7f7f7f", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
                 "#ff7f0e")
LABEL_BOX = dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85)


def pyplot(purpose: str = "--plot"):
    """matplotlib.pyplot on the Agg backend; `RuntimeError` naming `purpose` and the install command without it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError(f"{purpose} needs matplotlib: pip install 'fastv_advanced[plot]' (or pip install "
                           "matplotlib)") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colour(row: Row, groups: dict[str, str]) -> str:
    """Black for the baseline; one colour per group (`Row.group`), in the order the groups first appear."""
    if row.baseline:
        return "black"
    group = row.group or "?"
    return groups.setdefault(group, GROUP_COLOURS[len(groups) % len(GROUP_COLOURS)])


def _standard_error(row: Row) -> float:
    return 100 * math.sqrt(row.accuracy * (1 - row.accuracy) / row.samples) if row.samples else 0.0


def plot_comparison(comparison: Comparison, path: str | os.PathLike) -> Path:
    """Two panels, accuracy against the FLOPs ratio and against the median prefill latency: one labelled point per
    configuration (the baseline a black star), ±1 standard-error bars, the Pareto front as a dashed staircase."""
    path = Path(path)
    plt = pyplot()
    rows = comparison.rows
    others: dict[str, str] = {}
    colours = [_colour(row, others) for row in rows]
    height = 6.5 + 0.12 * max(0, len(rows) - 8)  # crowded grids get room for their labels
    fig, axes = plt.subplots(1, 2, figsize=(15, min(height, 11.0)), dpi=130)
    panels = (
        (axes[0], [None if r.flops_ratio is None else 100 * r.flops_ratio for r in rows],
         "Prefill FLOPs (% of the unpruned model)", "Accuracy vs. FLOPs"),
        (axes[1], [r.prefill_median_s for r in rows], "Median prefill latency, time to first token (s)",
         "Accuracy vs. prefill latency"),
    )
    for ax, xs, xlabel, title in panels:
        _panel(ax, rows, xs, colours, xlabel, title)

    handles, labels = [], []
    seen = set()
    for row, colour in zip(rows, colours):
        key = "Baseline" if row.baseline else (row.group or "?")
        if key in seen:
            continue
        seen.add(key)
        marker = "*" if row.baseline else "o"
        size = 13 if row.baseline else 8
        handles.append(plt.Line2D([], [], marker=marker, color=colour, linestyle="", markersize=size))
        labels.append("Baseline (no pruning)" if row.baseline else key)
    handles.append(plt.Line2D([], [], color="#444444", linestyle="--", linewidth=1.2))
    labels.append("Pareto front (max accuracy, min cost)")
    handles.append(plt.Line2D([], [], color="#999999", marker="|", linestyle="", markersize=12))
    labels.append("±1 standard error")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False, fontsize=9.5)

    samples = sorted({r.samples for r in rows})
    subtitle = f"{'/'.join(map(str, samples))} questions per run"
    if comparison.standard_error:
        subtitle += f"; one run's standard error ≈ ±{100 * comparison.standard_error:.1f} accuracy points"
    elif comparison.standard_error is not None:  # accuracy 0 or 1: the binomial bound
        subtitle += f"; one run's standard error up to ±{50 / math.sqrt(samples[0]):.1f} accuracy points"
    fig.suptitle(f"FastV Advanced on ScienceQA: accuracy against cost\n{subtitle}", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _panel(ax, rows: list[Row], xs: list[float | None], colours: list[str], xlabel: str, title: str) -> None:
    points = [(i, x, 100 * rows[i].accuracy) for i, x in enumerate(xs) if x is not None]
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Accuracy (%)")
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    if not points:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#888888")
        return
    for i, x, y in points:
        row = rows[i]
        ax.errorbar(x, y, yerr=_standard_error(row), color="#c8c8c8", linewidth=0.9, capsize=0, zorder=1)
        if row.baseline:
            ax.scatter([x], [y], marker="*", s=260, color="black", zorder=4, edgecolors="white", linewidths=0.6)
        else:
            ax.scatter([x], [y], marker="o", s=55, color=colours[i], zorder=3, edgecolors="white", linewidths=0.6)
    front = pareto_front([(x, y) for _, x, y in points])
    front_points = [points[k] for k in front]
    staircase = []  # steps-post: across at the cheaper point's accuracy, then up to the next point
    for (_, x0, y0), (_, x1, y1) in zip(front_points, front_points[1:]):
        staircase += [(x0, y0), (x1, y0)]
    staircase += [(front_points[-1][1], front_points[-1][2])]
    if len(front_points) > 1:
        ax.plot([p[0] for p in staircase], [p[1] for p in staircase], linestyle="--", color="#444444",
                linewidth=1.2, zorder=2)
    for _, x, y in front_points:
        ax.scatter([x], [y], s=170, facecolors="none", edgecolors="#444444", linewidths=1.0, zorder=2)
    _set_limits(ax, rows, points)
    _label_points(ax, rows, points, colours, staircase if len(front_points) > 1 else [])


def _set_limits(ax, rows: list[Row], points) -> None:
    xs = [x for _, x, _ in points]
    ys = [y for _, _, y in points]
    errors = [_standard_error(rows[i]) for i, _, _ in points]
    low = min(y - e for y, e in zip(ys, errors))
    high = max(y + e for y, e in zip(ys, errors))
    span = max(high - low, 4.0)
    middle = (low + high) / 2
    # Room for labels above and below, shifted (not stretched) to stay close to the 0-100 range of accuracies.
    bottom, top = middle - 0.75 * span, middle + 0.75 * span
    margin = min(0.06 * (top - bottom), 6.0)
    if bottom < -margin:
        bottom, top = -margin, top + (-margin - bottom)
    if top > 100 + margin:
        bottom, top = bottom - (top - 100 - margin), 100 + margin
    bottom, top = max(bottom, -margin), min(top, 100 + margin)
    ax.set_ylim(bottom, top)
    ax.set_yticks([t for t in ax.get_yticks() if -1e-9 <= t <= 100 + 1e-9])
    ax.set_ylim(bottom, top)
    x_span = max(max(xs) - min(xs), 0.1 * max(abs(max(xs)), 1e-9), 1e-9)
    ax.set_xlim(min(xs) - 0.3 * x_span, max(xs) + 0.3 * x_span)


def _label_points(ax, rows: list[Row], points, colours: list[str], line: list[tuple[float, float]]) -> None:
    """One label per distinct position (configurations at the same point share it), placed greedily where it
    overlaps no other label, no point and not the Pareto line, inside the axes; a thin leader line when it sits
    further away."""
    groups: dict[tuple, list[int]] = {}
    for i, x, y in points:
        groups.setdefault((round(x, 9), round(y, 9)), []).append(i)
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    point_boxes = []
    for (x, y) in groups:
        px, py = ax.transData.transform((x, y))
        point_boxes.append((px - 7, py - 7, px + 7, py + 7))
    for (x0, y0), (x1, y1) in zip(line, line[1:]):  # the Pareto line, as a chain of small boxes
        (a0, b0), (a1, b1) = ax.transData.transform((x0, y0)), ax.transData.transform((x1, y1))
        steps = max(1, int(math.hypot(a1 - a0, b1 - b0) // 4))
        for k in range(steps + 1):
            px, py = a0 + (a1 - a0) * k / steps, b0 + (b1 - b0) * k / steps
            point_boxes.append((px - 1.5, py - 1.5, px + 1.5, py + 1.5))
    placed: list[tuple[float, float, float, float]] = []
    candidates = [(dx, dy) for r in (10, 22, 36, 52, 70, 90) for dx, dy in
                  ((r, 0), (-r, 0), (0, r), (0, -r), (r, r), (-r, r), (r, -r), (-r, -r),
                   (r, 0.5 * r), (-r, 0.5 * r), (r, -0.5 * r), (-r, -0.5 * r))]
    # Crowded points first would be ideal; left to right keeps the result stable and readable.
    for (x, y), members in sorted(groups.items()):
        members.sort(key=lambda i: (not rows[i].baseline, i))
        text = "\n".join(rows[i].short_label for i in members)
        colour = colours[members[0]] if len({colours[i] for i in members}) == 1 else "#333333"
        px, py = ax.transData.transform((x, y))
        chosen = None
        for dx, dy in candidates:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                                fontsize=8.5, color=colour, zorder=5, bbox=LABEL_BOX)
            box = label.get_window_extent(renderer)
            bounds = (box.x0 - 2, box.y0 - 2, box.x1 + 2, box.y1 + 2)
            inside = (bounds[0] >= axes_box.x0 and bounds[2] <= axes_box.x1 and bounds[1] >= axes_box.y0
                      and bounds[3] <= axes_box.y1)
            clear = not any(_overlap(bounds, other) for other in placed + point_boxes)
            if inside and clear:
                chosen = (label, bounds, math.hypot(dx, dy))
                break
            label.remove()
        if chosen is None:  # nowhere free: put it to the right and accept the overlap
            label = ax.annotate(text, (x, y), xytext=(10, 0), textcoords="offset points", ha="left", va="center",
                                fontsize=8.5, color=colour, zorder=5, bbox=LABEL_BOX)
            box = label.get_window_extent(renderer)
            chosen = (label, (box.x0, box.y0, box.x1, box.y1), 10)
        label, bounds, distance = chosen
        if distance > 30:
            ax.annotate("", (x, y), xytext=label.get_position(), textcoords="offset points",
                        arrowprops=dict(arrowstyle="-", color="#999999", linewidth=0.7, shrinkA=0, shrinkB=4))
        placed.append(bounds)


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
