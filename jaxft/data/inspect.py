"""``jaxft data inspect``: what a data config turns into, before any training.

Reads a split once with the run's own encoder and packer and reports rows, tokens, the trained
token fraction, packing efficiency, truncated / dropped / skipped rows, a length histogram (PNG),
the chosen-vs-rejected length balance of preference data (a length-biased set teaches the model to
be short or long, not good) and the desirable/undesirable balance of KTO data, and a few rendered
examples with their trained tokens marked.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from jaxft.data.config import DataConfig
from jaxft.data.encode import DataStats, Encoder, Example, KtoExample, PairExample
from jaxft.data.iterator import open_split
from jaxft.data.packing import best_fit_decreasing

# KTO paper / TRL: desirable_weight * n_D / (undesirable_weight * n_U) should lie in [1, 4/3].
_KTO_RANGE = (1.0, 4.0 / 3.0)


@dataclass
class InspectReport:
    split: str
    family: str
    formats: dict[str, str]
    stats: dict[str, Any]
    seq_len: int
    trained_fraction: float
    lengths: dict[str, float]
    packed_rows: int = 0
    packing_efficiency: float | None = None  # real tokens / (rows x seq_len) as the run packs
    padded_efficiency: float | None = None  # the same with one example per row
    preference: dict[str, float] | None = None
    kto: dict[str, float] | None = None
    histogram: str | None = None
    warnings: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_data(
    cfg: DataConfig,
    tokenizer: Any,
    out_dir: str | None = None,
    split: str = "train",
    n_examples: int = 3,
) -> InspectReport:
    """Encode and pack ``split`` of ``cfg`` once; write ``lengths_{split}.png`` into ``out_dir``."""
    table, row_ids = open_split(cfg, split)
    encoder, stats = Encoder(cfg, tokenizer), DataStats()
    lengths: list[int] = []
    chosen: list[int] = []
    rejected: list[int] = []
    labels: list[bool] = []
    packed_rows, shown = 0, []
    for start in range(0, len(row_ids), cfg.pack_window):
        window = encoder.encode(table.read(row_ids[start : start + cfg.pack_window]), stats)
        sft = [ex for ex in window if isinstance(ex, Example)]
        lengths += [len(ex.ids) for ex in sft]
        packed_rows += (
            len(best_fit_decreasing([len(e.ids) for e in sft], cfg.seq_len))
            if cfg.pack
            else len(sft)
        )
        for ex in window:
            if isinstance(ex, PairExample):
                lengths += [len(ex.chosen.ids), len(ex.rejected.ids)]
                chosen.append(len(ex.chosen.ids) - ex.chosen.prompt_len)
                rejected.append(len(ex.rejected.ids) - ex.rejected.prompt_len)
            elif isinstance(ex, KtoExample):
                lengths.append(len(ex.example.ids))
                labels.append(ex.label)
        shown += [_show(ex, tokenizer) for ex in window[: n_examples - len(shown)]]
    report = InspectReport(
        split=split,
        family=table.family,
        formats={s.path: f for s, f in zip(table.sources, table.formats)},
        stats=stats.to_dict(),
        seq_len=cfg.seq_len,
        trained_fraction=stats.trained_tokens / stats.tokens if stats.tokens else 0.0,
        lengths=_summary(lengths),
        examples=shown,
    )
    if table.family == "sft" and lengths:
        report.packed_rows = packed_rows
        report.packing_efficiency = stats.tokens / (packed_rows * cfg.seq_len)
        report.padded_efficiency = stats.tokens / (len(lengths) * cfg.seq_len)
    if chosen:
        report.preference = _length_balance(np.array(chosen), np.array(rejected))
        report.warnings += _balance_warnings(report.preference, cfg.length_balance_tolerance)
    if labels:
        report.kto = _kto_balance(labels)
        report.warnings += _kto_warnings(report.kto)
    report.warnings += _stat_warnings(stats)
    if out_dir is not None and lengths:
        report.histogram = _histogram(
            lengths, chosen, rejected, cfg.seq_len, os.path.join(out_dir, f"lengths_{split}.png")
        )
    return report


def _summary(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    a = np.asarray(lengths)
    return {
        "n": len(a),
        "min": int(a.min()),
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
    }


def _length_balance(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Completion lengths in tokens: means, their ratio, and how often chosen is the longer."""
    return {
        "pairs": len(chosen),
        "chosen_mean": float(chosen.mean()),
        "rejected_mean": float(rejected.mean()),
        "ratio": float(chosen.mean() / max(rejected.mean(), 1e-9)),
        "chosen_longer": float((chosen > rejected).mean()),
        "chosen_shorter": float((chosen < rejected).mean()),
    }


def _balance_warnings(p: dict[str, float], tolerance: float) -> list[str]:
    bias = p["chosen_longer"] - p["chosen_shorter"]
    if abs(np.log(p["ratio"])) <= np.log1p(tolerance) and abs(bias) <= tolerance:
        return []
    side = "longer" if bias > 0 or p["ratio"] > 1 else "shorter"
    message = (
        f"length-biased preference data: chosen completions average {p['chosen_mean']:.0f} "
        f"tokens against {p['rejected_mean']:.0f} for rejected (ratio {p['ratio']:.2f}); "
        f"chosen is longer in {p['chosen_longer']:.0%} of pairs and shorter in "
        f"{p['chosen_shorter']:.0%}. DPO will learn to be {side}, not better: rebalance the "
        f"pairs (tolerance data.length_balance_tolerance={tolerance})"
    )
    return [message]


def _kto_balance(labels: list[bool]) -> dict[str, float]:
    n_d = int(sum(labels))
    n_u = len(labels) - n_d
    return {"desirable": n_d, "undesirable": n_u, "ratio": n_d / n_u if n_u else float("inf")}


def _kto_warnings(k: dict[str, float]) -> list[str]:
    n_d, n_u = int(k["desirable"]), int(k["undesirable"])
    if not n_d or not n_u:
        return [f"KTO data has {n_d} desirable and {n_u} undesirable rows: it needs both"]
    lo, hi = _KTO_RANGE
    if lo <= k["ratio"] <= hi:
        return []
    message = (
        f"KTO data has {n_d} desirable and {n_u} undesirable rows (ratio {k['ratio']:.2f}): "
        f"set the KTO weights so that desirable_weight*{n_d} / (undesirable_weight*{n_u}) is "
        f"in [1, 4/3], e.g. desirable_weight=1, undesirable_weight={n_d / n_u:.2f}"
    )
    return [message]


def _stat_warnings(stats: DataStats) -> list[str]:
    out = []
    if stats.skipped:
        out.append(f"{sum(stats.skipped.values())} bad rows skipped: {dict(stats.skipped)}")
    if stats.dropped:
        out.append(f"{sum(stats.dropped.values())} overlong rows dropped: {dict(stats.dropped)}")
    if stats.truncated:
        out.append(f"{stats.truncated} rows truncated to data.seq_len")
    return out


def _show(ex: Any, tokenizer: Any) -> dict[str, Any]:
    """An example as text pieces marked trained or not (for the terminal)."""
    if isinstance(ex, PairExample):
        return {
            "row": ex.gid,
            "chosen": _pieces(ex.chosen, tokenizer),
            "rejected": _pieces(ex.rejected, tokenizer),
        }
    if isinstance(ex, KtoExample):
        return {"row": ex.gid, "label": ex.label, "pieces": _pieces(ex.example, tokenizer)}
    return {"row": ex.gid, "pieces": _pieces(ex, tokenizer)}


def _pieces(ex: Example, tokenizer: Any) -> list[tuple[str, bool]]:
    change = np.flatnonzero(np.diff(ex.mask.astype(np.int8))) + 1
    bounds = [0, *change.tolist(), len(ex.ids)]
    return [
        (tokenizer.decode(ex.ids[a:b].tolist(), skip_special_tokens=False), bool(ex.mask[a]))
        for a, b in pairwise(bounds)
        if b > a
    ]


def _histogram(
    lengths: list[int], chosen: list[int], rejected: list[int], seq_len: int, path: str
) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if chosen else 1, 1)
    ax.hist(lengths, bins=50, color="tab:blue")
    ax.axvline(seq_len, color="tab:red", linestyle="--", label=f"seq_len {seq_len}")
    ax.set(xlabel="tokens per sequence", ylabel="sequences", title="lengths")
    ax.legend()
    if chosen:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.hist([chosen, rejected], bins=30, label=["chosen", "rejected"])
        ax2.set(xlabel="completion tokens", title="chosen vs rejected")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def format_report(report: InspectReport, color: bool = False) -> str:
    """A terminal rendering: figures, warnings, and examples with trained tokens highlighted."""
    s = report.stats
    formats = sorted(set(report.formats.values()))
    lines = [
        f"split {report.split}: {report.family} rows, formats {formats}",
        (
            f"rows {s['rows']}  examples {s['examples']}  tokens {s['tokens']}  trained tokens "
            f"{s['trained_tokens']} ({report.trained_fraction:.1%})"
        ),
        f"truncated {s['truncated']}  dropped {s['dropped'] or 0}  skipped {s['skipped'] or 0}",
    ]
    if report.lengths:
        L = report.lengths
        lines.append(
            f"lengths: min {L['min']}  mean {L['mean']:.0f}  p50 {L['p50']:.0f}  "
            f"p95 {L['p95']:.0f}  max {L['max']}  (seq_len {report.seq_len})"
        )
    if report.packing_efficiency is not None:
        lines.append(
            f"packing efficiency {report.packing_efficiency:.1%} in {report.packed_rows} "
            f"rows (padding each example alone: {report.padded_efficiency:.1%})"
        )
    if report.preference:
        p = report.preference
        lines.append(
            f"preference: {p['pairs']} pairs, completion tokens chosen {p['chosen_mean']:.0f}"
            f" / rejected {p['rejected_mean']:.0f} (ratio {p['ratio']:.2f}), chosen longer "
            f"in {p['chosen_longer']:.0%}, shorter in {p['chosen_shorter']:.0%}"
        )
    if report.kto:
        k = report.kto
        lines.append(
            f"kto: {k['desirable']} desirable, {k['undesirable']} undesirable "
            f"(ratio {k['ratio']:.2f})"
        )
    if report.histogram:
        lines.append(f"histogram: {report.histogram}")
    lines += [f"warning: {w}" for w in report.warnings]
    for ex in report.examples:
        for key in ("pieces", "chosen", "rejected"):
            if key in ex:
                label = (
                    f" ({key}, label {ex['label']})"
                    if "label" in ex
                    else (f" ({key})" if key != "pieces" else "")
                )
                lines.append(f"--- row {ex['row']}{label}")
                lines.append("".join(_mark(t, on, color) for t, on in ex[key]))
    return "\n".join(lines)


def _mark(text: str, trained: bool, color: bool) -> str:
    if not trained:
        return text
    return f"\x1b[1;32m{text}\x1b[0m" if color else f"[[{text}]]"
