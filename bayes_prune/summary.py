"""`python -m bayes_prune.summary DIR`: one line per run directory under DIR.

Lists every run directory, also those without a metrics.json (killed before their first record),
with its status, and for a `running` run whether a live process still holds it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .schema import METRICS, find_run_dirs, lock_holder


def _line(run_dir: Path, root: Path) -> str:
    where = run_dir.relative_to(root) if run_dir != root else Path(".")
    path = run_dir / METRICS
    holder = lock_holder(run_dir)
    if not path.exists():
        state = f"starting (pid {holder})" if holder else "no metrics.json (stopped before its first record)"
        return f"{'missing':11s} {state}  {where}"
    try:
        meta = json.loads(path.read_text())
        status = str(meta.get("status", "?"))
        final = meta.get("final") or {}
        history = meta.get("history") or []
        if status == "done":
            acc = final.get("test_acc")
            acc = f"{acc:.4f}" if isinstance(acc, float) and math.isfinite(acc) else "NaN"
            return (f"{'done':11s} sparsity {final.get('sparsity', math.nan):.4f}  test_acc {acc}  "
                    f"{final.get('wall_seconds', math.nan):6.1f}s  {where}")
        if status == "running" and not holder:
            status = "stopped"  # its process is gone (killed): resumable
        error = meta.get("error")
        why = (f"  {error.get('type')}: {error.get('message')}" if isinstance(error, dict)
               else f"  {error}" if error else "")
        return f"{status:11s} {len(history)} records{why[:160]}  {where}"
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        return f"{'unreadable':11s} {type(exc).__name__}: {exc}  {where}"


def lines(root: Path) -> list[str]:
    return [_line(d, root) for d in find_run_dirs(root)]


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs")
    print("\n".join(lines(root)) or f"no runs under {root}")


if __name__ == "__main__":
    main()
