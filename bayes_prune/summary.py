"""`python -m bayes_prune.summary DIR`: one line per run under DIR (status, sparsity, accuracy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def lines(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError:
            out.append(f"unreadable {path}")
            continue
        final = meta.get("final") or {}
        where = path.parent.relative_to(root)
        if meta.get("status") == "done":
            out.append(f"done     sparsity {final['sparsity']:.4f}  test_acc {final['test_acc']:.4f}  "
                       f"{final['wall_seconds']:6.1f}s  {where}")
        else:
            out.append(f"{meta.get('status', '?'):8s} {len(meta.get('history', []))} epochs  {where}")
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs")
    print("\n".join(lines(root)) or f"no runs under {root}")


if __name__ == "__main__":
    main()
