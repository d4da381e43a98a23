"""PNG plots of an A/B report: ROC and reliability curves per binary head (A and B overlaid), gate usage."""
from __future__ import annotations

import os
from typing import Dict, Tuple

import numpy as np

from serving.ab import stats

_COLORS = {"A": "tab:blue", "B": "tab:orange"}


def write_plots(out_dir: str, heads: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]],
                gates: Dict[str, Dict[str, list]], bins: int = 10) -> Dict[str, str]:
    """Write `<head>_curves.png` (ROC | reliability) per binary head and `gates.png`; returns name -> path.

    Args:
        out_dir: directory to write into (created).
        heads: head -> arm ("A"/"B") -> (labels [n], scores [n]); the arms may have different rows.
        gates: arm -> task -> mean gate weight per expert [E] (empty when no export has gate outputs).
        bins: reliability-curve bins.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for head, arms in heads.items():
        fig, (roc, rel) = plt.subplots(1, 2, figsize=(10, 4.5))
        for arm, (y, p) in arms.items():
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, p)
            if len(fpr) > 2000:  # a line of 2,000 points looks the same and draws much faster
                keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, 2000).astype(int), len(fpr) - 1])
                fpr, tpr = fpr[keep], tpr[keep]
            roc.plot(fpr, tpr, color=_COLORS.get(arm), label=f"{arm} (AUC {roc_auc_score(y, p):.4f})")
            curve = stats.reliability_curve(y, p, bins)
            rel.plot(curve["mean_score"], curve["positive_rate"], "o-", color=_COLORS.get(arm), label=arm)
        roc.plot([0, 1], [0, 1], ":", color="grey")
        roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{head}: ROC")
        rel.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
        rel.set(xlabel="mean predicted score (bin)", ylabel="observed positive rate",
                title=f"{head}: reliability ({bins} bins)", xlim=(0, 1), ylim=(0, 1))
        roc.legend(loc="lower right")
        rel.legend(loc="upper left")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{head}_curves.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[f"{head} ROC and reliability"] = path
    tasks = sorted({t for per_arm in gates.values() for t in per_arm})
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            arms = [a for a in gates if task in gates[a]]
            width = 0.8 / len(arms)
            for i, arm in enumerate(arms):
                weights = np.asarray(gates[arm][task])
                ax.bar(np.arange(len(weights)) + i * width, weights, width, color=_COLORS.get(arm), label=arm)
            experts = len(gates[arms[0]][task])
            ax.set_xticks(np.arange(experts) + width * (len(arms) - 1) / 2, [str(e) for e in range(experts)])
            ax.set(xlabel="expert", ylabel="mean gate weight", title=f"{task}: gate usage")
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "gates.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written["gate usage per task"] = path
    return written
