"""Result CSVs -> paper tables and plots.

    python -m pilot.tables RESULTS_DIR... [--methods simplecil,l2p,...] [--metrics acc_avg,acc_last,forgetting,time]
                           [--datasets ...] [--backbones ...] [--scenarios ...] [--compare [PUBLISHED_CSV]]
                           [--plots] [--heatmap RUN_DIR] [--out DIR]

Every ``sessions.csv`` under the given directories is one run (single runs and Hydra multirun sweeps
alike). Runs that differ only by their seed share a ``group_id`` (pilot/provenance.py) and make one
table cell: mean ± sample std (ddof=1) over seeds of the last session's values, with the number of
seeds. Rows are methods, columns are settings (dataset × backbone × scenario) × metrics:

* ``acc_avg``  = Ā, the average incremental accuracy (``acc_avg`` of the last session),
* ``acc_last`` = A_last, the top-1 after the last session (``acc`` of the last session),
* ``forgetting``, ``bwt``, ``acc_top5`` (last session), ``time`` (``elapsed_s`` of the last session,
  in minutes), ``memory`` (peak GPU memory over sessions, GB), ``params`` (trainable, millions);
* ``acc_nme_avg``, ``acc_nme``: Ā and A_last of nearest-mean-of-exemplars classification (learners with
  an exemplar memory, as LAMDA-PILOT reports NME beside the classifier); added to the default metrics
  when a tabulated run has them, empty (—) for learners without a memory.

When a tabulated run keeps exemplars, each setting also gets a ``memory`` column: the run's exemplar
memory from its ``config.yaml`` (``2000``: ``method.memory_size`` shared by the seen classes;
``20/class``: ``method.fixed_memory`` with ``method.memory_per_class``; — without a memory).

Groups with the same method/dataset/backbone/scenario labels but a different configuration (a
learning-rate sweep, ...) are never merged: each becomes its own row, labelled with the config
values that differ (read from each run's ``config.yaml``). Incomplete runs (fewer rows than
``num_sessions``) and superseded reruns of the same run_id are listed apart and never averaged.

Inputs are checked and never modified. A ``sessions.csv`` that is damaged or hand-edited (cut off,
wrong header, a value that is not a number or out of range, rows of two runs, a session twice or
missing) is left out with a warning naming the file and the problem; a group whose runs turn out
to differ is split by config (when ``config.yaml`` tells them apart) or refused, with a warning
(``results`` module docstring). Exit status: 0 = table written; 1 = no finished run to tabulate;
2 = bad input: a path that does not exist, no ``sessions.csv`` found, none of them usable, an
unknown metric, a bad ``--compare`` file or ``--heatmap`` run.

Sessions are numbered from 0 everywhere, as in the CSVs and the log: ``curves.csv``'s ``session``,
the published per-session values and the heat-map axes ("after session k (from 0)"); ``n`` in the
tables counts seeds, and "sessions 2/3" in the list of runs left out counts finished sessions.

Outputs (``--out``, default ``<first results dir>/tables``): ``table.md`` (also printed), ``table.tex``
(booktabs, best mean per column in bold), ``table.csv`` (long form: one row per cell with mean, std,
n, seeds, and the published value and difference with ``--compare``), ``incomplete.csv``; with
``--plots`` per setting ``curves_<dataset>_<backbone>_<scenario>.{png,svg}`` and ``curves.csv``; with
``--heatmap RUN_DIR`` the accuracy matrix of that run as ``heatmap_<run>.{png,svg}``.

Modules: ``results`` (reading runs, seed groups, variants, cells), ``published`` (published numbers),
``render`` (Markdown and LaTeX), ``plots`` (curves and heat maps), ``cli`` (the command line). Their
public names are re-exported here, so ``from pilot import tables; tables.load_results(...)`` works.
"""

from pilot.tables.cli import build_parser, main
from pilot.tables.plots import (
    COLUMN_WIDTH_IN,
    DPI,
    HEATMAP_SIZE_IN,
    STYLE,
    curve_data,
    curve_figure_size,
    plot_curves,
    plot_heatmap,
    read_matrix,
)
from pilot.tables.published import DEFAULT_PUBLISHED, attach_published, read_published, unmatched
from pilot.tables.render import PRETTY, to_latex, to_markdown
from pilot.tables.results import (
    CONFIG_FILE,
    DEFAULT_METRICS,
    MATRIX_FILE,
    METHOD_ORDER,
    METRICS,
    NME_METRICS,
    ROW,
    SESSIONS_FILE,
    SETTING,
    SPLIT_FILE,
    Metric,
    Results,
    TablesError,
    TablesWarning,
    assign_variants,
    check_groups,
    check_sessions,
    default_metrics,
    find_run_dirs,
    load_results,
    memory_label,
    read_run,
    select,
    summarize,
)

__all__ = [
    # results
    "SESSIONS_FILE",
    "MATRIX_FILE",
    "CONFIG_FILE",
    "SPLIT_FILE",
    "SETTING",
    "ROW",
    "METHOD_ORDER",
    "Metric",
    "METRICS",
    "DEFAULT_METRICS",
    "NME_METRICS",
    "default_metrics",
    "memory_label",
    "TablesError",
    "TablesWarning",
    "find_run_dirs",
    "check_sessions",
    "read_run",
    "Results",
    "load_results",
    "check_groups",
    "assign_variants",
    "summarize",
    "select",
    # published
    "DEFAULT_PUBLISHED",
    "read_published",
    "attach_published",
    "unmatched",
    # render
    "PRETTY",
    "to_markdown",
    "to_latex",
    # plots
    "COLUMN_WIDTH_IN",
    "DPI",
    "STYLE",
    "HEATMAP_SIZE_IN",
    "curve_data",
    "curve_figure_size",
    "plot_curves",
    "read_matrix",
    "plot_heatmap",
    # cli
    "build_parser",
    "main",
]
