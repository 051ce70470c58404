"""The search's trajectory figure: each trial's score with the best so far, and the searched values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

__all__ = ["plot_trajectory", "trial_points"]


def trial_points(study: optuna.Study) -> list[dict[str, Any]]:
    """The trials as the figure takes them: number, state, score (None unless complete), params."""
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "score": t.value if t.state == TrialState.COMPLETE else None,
            "params": dict(t.params),
        }
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.FAIL)
    ]


def plot_trajectory(points: Sequence[Mapping[str, Any]], metric: str, direction: str, title: str) -> bytes:
    """The search trajectory as a PNG: each trial's score by trial number with the best-so-far line
    (the kept candidates marked) above, the searched values per trial (log scale) below; failed
    trials as red crosses at the foot of the score panel."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: p["number"])
    done = [p for p in points if p.get("score") is not None]
    failed = [p for p in points if p.get("score") is None]
    fig, (ax, axp) = plt.subplots(
        2, 1, figsize=(6.4, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    better = max if direction == "maximize" else min
    best, best_line, kept = None, [], []
    for p in done:
        if best is None or better(best, p["score"]) != best:
            kept.append(p)
        best = p["score"] if best is None else better(best, p["score"])
        best_line.append(best)
    if done:
        xs = [p["number"] for p in done]
        ax.plot(xs, [p["score"] for p in done], "o", color="C0", alpha=0.6, label="trial")
        ax.step(xs, best_line, where="post", color="C1", label="best so far")
        ax.plot([p["number"] for p in kept], [p["score"] for p in kept], "*", color="C1", markersize=11,
                label="kept (better)")  # fmt: skip
    if failed:
        ax.plot([p["number"] for p in failed], [0.02] * len(failed), "x", color="red",
                transform=ax.get_xaxis_transform(), label="failed")  # fmt: skip
    ax.set_ylabel(f"{metric} ({direction})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    names = sorted({k for p in points for k in p.get("params", {})})
    for i, name in enumerate(names):
        pts = [(p["number"], p["params"][name]) for p in points if name in p.get("params", {})]
        axp.plot([x for x, _ in pts], [v for _, v in pts], "o-", color=f"C{i + 2}", alpha=0.7, label=name,
                 markersize=4)  # fmt: skip
    if names:
        axp.set_yscale("log")
        axp.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    axp.xaxis.set_major_locator(MaxNLocator(integer=True))
    axp.set_ylabel("searched value")
    axp.set_xlabel("trial")
    axp.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
