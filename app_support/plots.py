"""matplotlib figures for the training and evaluation pages (no streamlit here).

Each function returns a new Figure; the page passes it to st.pyplot and closes it, so figures do
not pile up in a long-running server.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from app_support.fonts import use_cjk_font
from app_support.runs import series


def loss_figure(runs: dict[str, list[dict]]) -> Figure:
    """Train loss (solid) and eval loss (dashed, dots) against step, one colour per run."""
    use_cjk_font()
    # Figure() rather than pyplot.figure(): no global pyplot state shared between sessions' threads.
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    plotted = False
    for (name, records), colour in zip(runs.items(), colours, strict=True):
        steps, losses = series(records, "loss")
        if steps:
            ax.plot(steps, losses, color=colour, linewidth=1.6, label=f"{name} 训练 train loss")
            plotted = True
        steps, losses = series(records, "eval_loss")
        if steps:
            ax.plot(steps, losses, color=colour, linestyle="--", marker="o", markersize=4,
                    label=f"{name} 验证 eval loss")
            plotted = True
    ax.set_xlabel("步数 step")
    ax.set_ylabel("损失 loss")
    ax.set_title("训练曲线 loss curves")
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "没有记录 no logged loss yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def confusion_figure(confusion: dict) -> Figure:
    """Heat map of the confusion matrix from model.metrics: gold rows, predicted columns, counts."""
    use_cjk_font()
    rows, columns, matrix = confusion["labels"], confusion["columns"], confusion["matrix"]
    # Small inches, so the labels stay readable once Streamlit scales the image to a half-width column.
    size = max(3.5, 0.36 * len(columns) + 1.6)
    fig = Figure(figsize=(size, size), dpi=120)
    ax = fig.subplots()
    ax.tick_params(labelsize=11)
    ax.imshow(matrix, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel("预测 predicted")
    ax.set_ylabel("真实 gold")
    ax.set_title("混淆矩阵 confusion matrix")
    peak = max((max(row) for row in matrix if row), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=10,
                        color="white" if count > peak / 2 else "black")
    fig.tight_layout()
    return fig
