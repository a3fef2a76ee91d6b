"""What a run writes for people: metrics JSONL, TensorBoard events, a loss/learning-rate PNG.

Only process 0 writes. On resume, records past the restored step are dropped, so the files
describe exactly the steps of the resumed run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep only what happened before the restored step
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None
        self._file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, float) or hasattr(v, "item") else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train vs validation loss (left axis) and learning rate (right axis) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    lr = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token NLL)")
    ax.grid(alpha=0.3)
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="tab:gray", lw=1, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    else:
        ax.legend(loc="upper right")
    ax.set_title(title or "training")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_preference(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Rewards of chosen and rejected completions and their margin (train and validation), and
    preference accuracy, against step: what a DPO-family run is learning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    series = {k: [(r["step"], r[k]) for r in records if k in r] for k in (
        "rewards/chosen", "rewards/rejected", "rewards/margins", "val_rewards/margins",
        "rewards/accuracies", "val_rewards/accuracies", "val_policy_accuracy", "kl_ref")}
    if not series["rewards/margins"]:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    styles = {"rewards/chosen": ("tab:green", "-"), "rewards/rejected": ("tab:red", "-"),
              "rewards/margins": ("tab:blue", "-"), "val_rewards/margins": ("tab:blue", "o--")}
    for key, (color, style) in styles.items():
        if series[key]:
            ax.plot(*zip(*series[key]), style, color=color, lw=1.2, label=key)
    ax.axhline(0, color="gray", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("implicit reward  beta * (log p - log p_ref)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    for key, color in (("rewards/accuracies", "tab:blue"), ("val_rewards/accuracies", "tab:orange"),
                       ("val_policy_accuracy", "tab:purple")):
        if series[key]:
            ax2.plot(*zip(*series[key]), "o-" if key.startswith("val") else "-", color=color,
                     lw=1.2, label=key)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("step")
    ax2.set_ylabel("preference accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right")
    fig.suptitle(title or "preference training")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
