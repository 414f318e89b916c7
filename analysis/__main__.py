"""`python -m analysis RUNS_DIR [--out DIR] [--variant V] [--no-figures]`

Collects every run under RUNS_DIR, prints a summary and the problem runs, writes Table 1
(md/tex/csv), figures and report.html into DIR (default RUNS_DIR/analysis, which collection
skips), and prints the Markdown table. Runs of a family with an analysis of its own (paper 001's
`lobs`, paper 002's BMRS methods, paper 003's `self_compress`) are handed to it
(`analysis.lobs`, `analysis.bmrs`, `analysis.evi`), which writes into DIR/<family>; Table 1 covers
the other runs. Broken runs are reported, not fatal; exit status 2 when RUNS_DIR is missing or
holds no metrics.json.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module
from pathlib import Path

from .collect import collect, find_metrics
from .report import write_report
from .table import table1, to_markdown, write_table1

# pruner.method -> the module of analysis/ that tabulates and draws that family's runs
FAMILIES = {"lobs": "lobs", "self_compress": "evi",
            **{m: "bmrs" for m in ("bmrs_n", "bmrs_u", "snr", "e_theta", "l2", "bmrs_post", "bmrs_none")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis", description="Table 1, figures and report for bayes_prune runs.")
    parser.add_argument("runs_dir", type=Path, help="directory searched for */metrics.json")
    parser.add_argument("--out", type=Path, default=None, help="default: RUNS_DIR/analysis")
    parser.add_argument("--variant", default=None,
                        help='only this row variant, e.g. "lr=0.01" ("" = the most common '
                             'settings; default: every variant, one table row each)')
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    args = parser.parse_args(argv)

    out = args.out or args.runs_dir / "analysis"
    if not args.runs_dir.is_dir():
        print(f"error: runs directory {args.runs_dir} does not exist", file=sys.stderr)
        return 2
    if not find_metrics(args.runs_dir, exclude=[out]):
        print(f"error: no run directories (no metrics.json, checkpoint or .lock) found under "
              f"{args.runs_dir}", file=sys.stderr)
        return 2

    col = collect(args.runs_dir, exclude=[out])
    counts = ", ".join(f"{k} {v}" for k, v in col.status_counts().items())
    print(f"runs under {args.runs_dir}: {counts}")
    for p in col.problems.itertuples():
        print(f"  problem [{p.status}] {p.run_dir}: {p.reason}")
    variants = sorted(set(col.runs["variant"])) if len(col.runs) else []
    if len(variants) > 1:
        print("variants present: " + ", ".join(repr(v) for v in variants))

    own = col.runs["method"].isin(list(FAMILIES)) if len(col.runs) else None
    if own is not None and own.any():
        for family in sorted({FAMILIES[m] for m in col.runs.loc[own, "method"]}):
            print(f"\n{family} runs: python -m analysis.{family} -> {out / family}")
            rc = import_module(f"analysis.{family}").main([str(args.runs_dir), "--out", str(out / family)])
            if rc:
                return rc
        if own.all():
            return 0
        col.runs = col.runs[~own]
        col.history = col.history[col.history["run_dir"].isin(col.runs["run_dir"])]
        print()

    wide = table1(col.runs, variant=args.variant)
    written = write_table1(wide, out)
    figures = []
    if not args.no_figures:
        from .figures import all_figures  # seaborn/matplotlib import is slow; only when needed

        figures = all_figures(col.runs, col.history, out / "figures", args.variant)
    written.append(write_report(col, wide, figures, out))
    for path in written:
        print(f"wrote {path}")
    if figures:
        print(f"wrote {len(figures)} figures (PNG + PDF) into {out / 'figures'}")
    print()
    print(to_markdown(wide))
    return 0


if __name__ == "__main__":
    sys.exit(main())
