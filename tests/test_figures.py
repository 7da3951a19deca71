"""Figures for a paper or a talk (pilot/tables/plots.py): readable names, colour-blind-safe colours
with a marker and a line style per method, PNG + SVG + PDF, sessions numbered from 0 as in the
CSVs, and ``--heatmap RUN_DIR`` on its own drawing only the heat map.

The runs are hand-written in the layout of pilot/sinks/csv.py (``write_run`` of test_tables.py):
three methods on ImageNet-R B0Inc20 (3 sessions), SimpleCIL with two seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import rc_context
from PIL import Image
from test_tables import write_run

from pilot import tables
from pilot.tables.plots import OKABE_ITO, STYLE, curve_figures, heatmap_figure, heatmap_title, plot_curves

SETTING = dict(dataset="imagenet_r", backbone="vit_b16_in1k", scenario="B0Inc20")
MATRIX = np.array([[80.0, np.nan, np.nan], [70.0, 82.0, np.nan], [60.0, 71.0, 79.0]])


@pytest.fixture
def three_methods(tmp_path) -> Path:
    root = tmp_path / "results"
    write_run(root / "coda_s1", method="coda", seed=1, acc=[80, 76, 70], matrix=MATRIX, **SETTING)
    write_run(root / "l2p_s1", method="l2p", seed=1, acc=[78, 72, 66], **SETTING)
    write_run(root / "simplecil_s1", method="simplecil", seed=1, acc=[75, 70, 64], **SETTING)
    write_run(root / "simplecil_s2", method="simplecil", seed=2, acc=[73, 69, 62], **SETTING)
    return root


def curves_of(root: Path):
    results = tables.load_results([root])
    return tables.curve_data(results, tables.summarize(results.runs, ["acc_last"]))


def tick_texts(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


def test_curves_have_readable_names_and_a_distinct_style_per_method(three_methods):
    with rc_context(STYLE):
        ((stem, fig),) = curve_figures(curves_of(three_methods))
        fig.draw_without_rendering()
    assert stem == "curves_imagenet_r_vit_b16_in1k_B0Inc20"  # file names keep the identifiers
    ax = fig.axes[0]
    assert ax.get_title() == "ImageNet-R · ViT-B/16-IN1K · B0Inc20"
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["CODA-Prompt", "L2P", "SimpleCIL"]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["CODA-Prompt", "L2P", "SimpleCIL"]
    colors = [line.get_color() for line in lines]
    assert colors == list(OKABE_ITO[:3]) and len(set(colors)) == 3
    assert len({line.get_marker() for line in lines}) == 3
    assert len({line.get_linestyle() for line in lines}) == 3
    assert "--" not in {line.get_linestyle() for line in lines}  # dashes are kept for published values
    assert [h.get_marker() for h in legend.legend_handles] == [line.get_marker() for line in lines]
    # Lower axis: classes seen, a tick at each session's count; upper axis: the session, from 0.
    assert ax.get_xlabel() == "classes seen" and tick_texts(ax.xaxis) == ["20", "40", "60"]
    (top,) = ax.child_axes
    assert top.get_xlabel() == "after session (from 0)" and tick_texts(top.xaxis) == ["0", "1", "2"]
    assert list(top.get_xticks()) == [20, 40, 60]


def test_published_values_are_dashed_in_the_methods_colour(three_methods, tmp_path):
    published = tmp_path / "published.csv"
    published.write_text(
        "method,dataset,backbone,scenario,metric,value,source,note,session\n"
        + "".join(f"coda,imagenet_r,vit_b16_in1k,B0Inc20,acc,{v},test,,{k}\n" for k, v in enumerate([81, 77, 71]))
    )
    with rc_context(STYLE):
        ((_, fig),) = curve_figures(curves_of(three_methods), tables.read_published(published))
    ax = fig.axes[0]
    ours, ref = ax.get_lines()[0], ax.get_lines()[3]  # CODA-Prompt is the first row (the runs' order)
    assert ours.get_label() == "CODA-Prompt"
    assert ref.get_linestyle() == "--" and ref.get_color() == ours.get_color() == OKABE_ITO[0]
    assert ref.get_marker() == ours.get_marker() and ref.get_markerfacecolor() == "none"
    assert list(ref.get_xdata()) == [20, 40, 60] and list(ref.get_ydata()) == [81.0, 77.0, 71.0]
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == "published (dashed)"


def test_every_figure_is_written_as_png_svg_and_pdf(three_methods, tmp_path):
    out = tmp_path / "out"
    args = [str(three_methods), "--out", str(out), "--plots", "--heatmap", str(three_methods / "coda_s1")]
    assert tables.main(args) == 0
    for stem in ("curves_imagenet_r_vit_b16_in1k_B0Inc20", "heatmap_coda_s1"):
        for fmt in ("png", "svg", "pdf"):
            assert (out / f"{stem}.{fmt}").stat().st_size > 1000, (stem, fmt)
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        with Image.open(out / f"{stem}.png") as image:
            assert image.size[0] == 990  # one column: 3.3 in at 300 dpi
    svg = (out / "curves_imagenet_r_vit_b16_in1k_B0Inc20.svg").read_text()
    assert "CODA-Prompt" in svg and "ImageNet-R" in svg and "after session (from 0)" in svg
    assert "#0072b2" in svg.lower()  # Okabe-Ito blue, the first row's colour


def test_heatmap_names_the_run_and_numbers_sessions_from_0():
    with rc_context(STYLE):
        fig = heatmap_figure(MATRIX, heatmap_title({"method": "coda", "dataset": "imagenet_r", "scenario": "B0Inc20"}))
        fig.draw_without_rendering()
    ax = fig.axes[0]
    assert ax.get_title() == "CODA-Prompt · ImageNet-R · B0Inc20"
    assert tick_texts(ax.xaxis) == tick_texts(ax.yaxis) == ["0", "1", "2"]
    assert ax.get_xlabel() == "test classes of session j (from 0)" and ax.get_ylabel() == "after session k (from 0)"
    assert sorted(t.get_text() for t in ax.texts) == sorted(["80.0", "70.0", "82.0", "60.0", "71.0", "79.0"])
    assert heatmap_title({"method": "simplecil", "dataset": "cifar100", "scenario": "B0Inc10", "seed": 3}) == (
        "SimpleCIL · CIFAR-100 · B0Inc10 · seed 3"
    )


def test_heatmap_alone_writes_only_the_heatmap(three_methods, tmp_path, capsys):
    run = three_methods / "coda_s1"
    out = tmp_path / "out"
    assert tables.main(["--heatmap", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "heatmap_coda_s1.pdf",
        "heatmap_coda_s1.png",
        "heatmap_coda_s1.svg",
    ]
    assert capsys.readouterr().out == ""  # no table printed
    # Without --out the heat map goes to <RUN_DIR>/tables; the run's own files are untouched.
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert tables.main(["--heatmap", str(run)]) == 0
    assert sorted(p.name for p in (run / "tables").iterdir()) == sorted(p.name for p in out.iterdir())
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_heatmap_alone_checks_the_matrix_before_writing(three_methods, tmp_path, capsys):
    out = tmp_path / "out"
    assert tables.main(["--heatmap", str(three_methods / "l2p_s1"), "--out", str(out)]) == 2  # no matrix.csv
    assert "matrix.csv not found" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        tables.main(["--heatmap", str(three_methods / "coda_s1"), "--plots"])
    assert exit_info.value.code == 2 and "--plots needs results directories" in capsys.readouterr().err


def test_plot_curves_honours_formats(three_methods, tmp_path):
    written = plot_curves(curves_of(three_methods), tmp_path, formats=("pdf",))
    assert [p.name for p in written] == ["curves_imagenet_r_vit_b16_in1k_B0Inc20.pdf"]
