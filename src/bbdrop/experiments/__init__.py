"""The paper's experiments: shipped configurations, runs over seeds, the table and figures.

``reproduce(name, seeds)`` runs the pipeline once per seed in
``<out>/<name>/seed-<n>/`` (each run resumable), then writes
``<out>/<name>/table.md`` in the paper's layout (rows Original, BB, DBB;
columns error, units per layer, FLOP speedup and memory by both counting rules
of docs/method.md section 5; medians over seeds) and the figures of the first
seed.

One module per job (each imports only those above it in this list):

- ``order``: the paper's order of methods and stages (``METHOD_ORDER``), shared;
- ``catalogue``: the shipped experiments (``list_experiments``, ``experiment_config``);
- ``scales``: a sweep's scales, their folder names and the selection rule
  (``scale_name``, ``select_scale``, ``SELECTION_MARGIN``);
- ``borrowing``: finished stages one run takes from another that is the same computation;
- ``runner``: plans, their runs over seeds, one by one or in worker processes;
- ``tables``: medians over seeds, the markdown table, tested runs read back
  (``summarize``, ``markdown_table``, ``tested_runs``);
- ``figures``: training curves, DBB masks, sweep fronts (``write_figures``, ``write_front``);
- ``reproduction``: ``reproduce``;
- ``sweeps``: ``sweep``;
- ``finished``: a finished run loaded back and compacted (``load_stage``, ``compact_run``).
"""

from __future__ import annotations

from .catalogue import experiment_config, list_experiments
from .figures import FIGURE_NAMES as FIGURE_NAMES
from .figures import write_figures, write_front
from .finished import compact_run as compact_run
from .finished import load_stage as load_stage
from .order import METHOD_ORDER as METHOD_ORDER
from .reproduction import reproduce
from .scales import SELECTION_MARGIN, select_scale
from .scales import _scaled as _scaled
from .scales import scale_name as scale_name
from .sweeps import sweep
from .tables import FIGURES as FIGURES
from .tables import ROW_NAMES as ROW_NAMES
from .tables import markdown_table
from .tables import summarize as summarize
from .tables import tested_runs as tested_runs

__all__ = [
    "SELECTION_MARGIN",
    "experiment_config",
    "list_experiments",
    "markdown_table",
    "reproduce",
    "select_scale",
    "sweep",
    "write_figures",
    "write_front",
]
