"""The evaluation report: `report.json` (every number with its suite, judge, sample count and 95 %
interval, for scripts and papers), and the same content for people as `report.md` and `report.html`
(tables, distributions, the run's per-codebook loss curves, playable samples).

Both documents are rendered from one list of blocks, so they cannot disagree.
"""

from __future__ import annotations

import csv
import html
import json
import time
from pathlib import Path

import numpy as np

from eval.suites import SuiteResult

# Which per-sample value each suite's distribution plot shows.
DISTRIBUTIONS = {"wer": ("wer", "per-utterance WER"), "mos": ("dnsmos", "DNSMOS"), "sim": ("similarity", "cosine")}


def numbers(results: list[SuiteResult], model: dict) -> list[dict]:
    """Every reported number as one flat row."""
    return [
        {"suite": r.suite, "metric": name, **estimate.as_dict(), "judge": r.judge, "checkpoint": model["checkpoint"]}
        for r in results
        for name, estimate in r.metrics.items()
    ]


def write_report(results: list[SuiteResult], model: dict, settings: dict, out_dir: str | Path) -> Path:
    """Writes report.json, report.md, report.html (and plots/) under `out_dir`; returns report.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "settings": settings,
        "numbers": numbers(results, model),
        "suites": {r.suite: r.as_dict() for r in results},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    blocks = _blocks(results, model, settings, out_dir)
    (out_dir / "report.md").write_text(_markdown(blocks))
    (out_dir / "report.html").write_text(_html(blocks))
    return out_dir / "report.md"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "—" if value is None else str(value)


def _blocks(results: list[SuiteResult], model: dict, settings: dict, out_dir: Path) -> list[tuple]:
    """Blocks: ("h", level, text), ("note", bold lead, text), ("table", header, rows), ("img", path, caption),
    ("audio", header, [(path, cells)])."""
    blocks: list[tuple] = [("h", 1, "CSM evaluation")]
    blocks.append(
        (
            "table",
            ["", ""],
            [[k, _fmt(v)] for k, v in model.items()] + [["samples per suite", _fmt(settings.get("limit") or "all")]],
        )
    )
    rows = [
        [r.suite, name, _fmt(e.value), f"[{e.low:.3f}, {e.high:.3f}]", str(e.n), r.judge]
        for r in results
        for name, e in r.metrics.items()
        if "/" not in name
    ]
    blocks += [("h", 2, "Results"), ("table", ["suite", "metric", "value", "95% CI", "n", "judge"], rows)]
    for r in results:
        if r.refused:
            blocks.append(("note", f"{r.suite}: no number reported.", r.refused))
    per_word = [
        [r.suite, name.split("/", 1)[1], _fmt(e.value), f"[{e.low:.3f}, {e.high:.3f}]", str(e.n)]
        for r in results
        for name, e in r.metrics.items()
        if "/" in name
    ]
    if per_word:
        blocks += [("h", 2, "Accuracy per word"), ("table", ["suite", "word", "accuracy", "95% CI", "n"], per_word)]

    plots = out_dir / "plots"
    run_dir = model.get("run_dir")
    curves = _loss_curves(Path(run_dir) / "logs" / "metrics.csv", plots) if run_dir else None
    distributions = _distributions(results, plots)
    if curves or distributions:
        blocks.append(("h", 2, "Plots"))
    if curves:
        blocks.append(("img", curves.relative_to(out_dir), "training loss per codebook (the run's metrics.csv)"))
    if distributions:
        blocks.append(("img", distributions.relative_to(out_dir), "per-sample distributions"))

    for r in results:
        heard = [s for s in r.samples if "audio" in s]
        if heard:
            columns = [k for k in heard[0] if k not in ("audio", "id")]
            blocks += [
                ("h", 2, f"Samples: {r.suite}"),
                ("audio", ["id", *columns], [(s["audio"], [s["id"], *(_fmt(s[c]) for c in columns)]) for s in heard]),
            ]
    return blocks


def _markdown(blocks: list[tuple]) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "note":
            lines += [f"**{block[1]}** {block[2]}", ""]
        elif kind in ("table", "audio"):
            header, rows = block[1], block[2]
            if kind == "audio":
                header, rows = header + ["audio"], [[*cells, f"[wav]({path})"] for path, cells in rows]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


def _html(blocks: list[tuple]) -> str:
    def table(header, rows) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "note":
            parts.append(f"<p><b>{html.escape(block[1])}</b> {html.escape(block[2])}</p>")
        elif kind == "table":
            parts.append(table(block[1], [[html.escape(c) for c in row] for row in block[2]]))
        elif kind == "audio":
            rows = [
                [*(html.escape(c) for c in cells), f'<audio controls src="{path}"></audio>'] for path, cells in block[2]
            ]
            parts.append(table([*block[1], "audio"], rows))
        elif kind == "img":
            parts.append(
                f'<figure><img src="{block[1]}" width="720"><figcaption>{html.escape(block[2])}</figcaption></figure>'
            )
    style = "body{font-family:sans-serif;max-width:960px;margin:auto}td,th{padding:2px 8px;text-align:left}"
    return f"<!doctype html><meta charset=utf-8><title>CSM evaluation</title><style>{style}</style>\n" + "\n".join(
        parts
    )


def _loss_curves(metrics_csv: Path, plots: Path) -> Path | None:
    """One line per codebook's training loss against the step (Lightning's CSVLogger file)."""
    if not metrics_csv.exists():
        return None
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    columns = sorted(k for k in (rows[0] if rows else {}) if k.startswith("codebook_loss/"))
    if not columns:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    colors = plt.cm.viridis(np.linspace(0, 1, len(columns)))
    for column, color in zip(columns, colors, strict=True):
        points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, color=color, linewidth=1.5 if column.endswith("/00") else 0.8, label=column[-2:])
    ax.set(xlabel="step", ylabel="cross-entropy", title="loss per codebook (00 = semantic, bold)")
    ax.legend(ncol=2, fontsize=6, title="codebook", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, plots / "codebook_loss.png")


def _distributions(results: list[SuiteResult], plots: Path) -> Path | None:
    shown = [(r, *DISTRIBUTIONS[r.suite]) for r in results if r.suite in DISTRIBUTIONS and r.samples]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3), squeeze=False)
    for ax, (result, key, label) in zip(axes[0], shown, strict=True):
        ax.hist([s[key] for s in result.samples], bins=20, color="tab:blue")
        ax.set(title=result.suite, xlabel=label, ylabel="samples")
    return _save(fig, plots / "distributions.png")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
