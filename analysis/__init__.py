"""Analysis of bayes_prune runs: collect metrics.json files, Table 1, figures, an HTML report.

    python -m analysis RUNS_DIR [--out DIR] [--variant V] [--no-figures]
"""

from .collect import Collected, collect
from .table import load_paper, table1, write_table1

__all__ = ["Collected", "collect", "load_paper", "table1", "write_table1"]
