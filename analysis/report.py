"""One self-contained HTML page: run counts, problem runs, Table 1 and every PNG figure inline."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .collect import Collected
from .table import formatted

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; font-size: 0.85em; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
figure { margin: 1em 0; }
img { max-width: 100%; }
figcaption { font-family: monospace; color: #555; }
"""


def _frame_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, na_rep="—", border=0)


def render_report(collected: Collected, wide: pd.DataFrame,
                  figures: Iterable[str | Path] = (), title: str = "bayes_prune analysis") -> str:
    counts = pd.DataFrame(list(collected.status_counts().items()), columns=["status", "runs"])
    variant = wide.attrs.get("variant", "")
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.</p>",
        "<h2>Runs by status</h2>", _frame_html(counts),
        f"<h2>Problem runs ({len(collected.problems)})</h2>",
        _frame_html(collected.problems) if len(collected.problems) else "<p>None.</p>",
        "<h2>Table 1</h2>",
        "<p>Final test accuracy: mean ± sample std (ddof=1) over seeds, n runs, mean realised "
        "sparsity; [paper value, Δ = ours − paper]. Only finished runs count."
        + (f" Variant: <code>{html.escape(variant)}</code>." if variant else "") + "</p>",
        _frame_html(formatted(wide)) if len(wide) else "<p>No finished runs.</p>",
        "<h2>Figures</h2>",
    ]
    for path in (Path(f) for f in figures):
        if path.suffix.lower() != ".png":
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f'<figure><img src="data:image/png;base64,{data}" '
                     f'alt="{html.escape(path.stem)}"><figcaption>{html.escape(path.name)}'
                     "</figcaption></figure>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def write_report(collected: Collected, wide: pd.DataFrame, figures: Iterable[str | Path],
                 out_dir: str | Path) -> Path:
    """Write `report.html` into `out_dir` and return its path."""
    path = Path(out_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(collected, wide, figures), encoding="utf-8")
    return path
