"""The report's table model and its rendering: paper-shaped tables from hand-built models, reference
rows read from reproduce.yaml (a citation required), labelled figures, and the whole report from an
MLflow store written here."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from bundle_utils import ROOT
from medseg_monai.errors import InputError
from medseg_monai.report import (
    Items,
    Paragraph,
    Table,
    curves_figure,
    paper_blocks,
    render_html,
    render_markdown,
    sweep_figure,
)
from medseg_monai.tables import Cell, PaperTable, Reference, Row, load_references

HEADER = {
    "dataset": "jsrt-scr (real, 1234abcd)",
    "split": "Scored on the validation split.",
    "commit": "abcdef12",
    "date": "2026-01-02",
    "hardware": "cpu",
    "profile": "quick",
}
OBSERVER = Reference(
    "second observer", {"dice_heart": 0.878}, "A. Author, Some Journal 2006, table 3", "Jaccard"
)


def _table(**overrides: Any) -> PaperTable:
    """baseline: dice 0.90 and 0.92 over two seeds (mean 0.91, sd sqrt(0.0002) = 0.014142) against the
    paper's 0.95 (ours - paper = -0.04), heart 0.80 on one seed and no paper figure; t1: nothing
    scored, the paper's dice 0.5."""
    rows = [
        Row("baseline", {"dice": Cell((0.90, 0.92), 0.95), "dice_heart": Cell((0.80,))}, HEADER["dataset"],
            runs=("aaaa1111", "bbbb2222"), note="poster: 400 / 100 images"),
        Row("t1", {"dice": Cell((), 0.5), "dice_heart": Cell()}, HEADER["dataset"], runs=("cccc3333",)),
    ]  # fmt: skip
    fields = {"study": "xray", "profile": "quick", "metrics": ["dice", "dice_heart"], "rows": rows,
              "references": [OBSERVER], "header": HEADER, **overrides}  # fmt: skip
    return PaperTable(**fields)


def test_cells_spread_n_paper_and_difference() -> None:
    table = _table()
    # a paper column and a difference column only for the metric a row has a paper figure for
    assert table.columns() == ["experiment", "dice", "dice paper", "dice ours - paper", "dice_heart", "runs"]
    assert table.body() == [
        ["baseline", "0.9100 ± 0.0141 (n=2)", "0.95", "-0.0400", "0.8000 (n=1)", "aaaa1111 bbbb2222"],
        ["t1", "-", "0.5", "-", "-", "cccc3333"],
        ["reference: second observer", "-", "-", "-", "0.878", "-"],
    ]


def test_header_once_notes_and_citations() -> None:
    blocks = paper_blocks(_table())
    assert not any(isinstance(b, Paragraph) for b in blocks)  # real data: no synthetic label
    md = render_markdown(blocks)
    for key, value in HEADER.items():
        assert md.count(f"- {key}: {value}\n") == 1
    assert md.count("jsrt-scr (real, 1234abcd)") == 1  # not on every row: the header says it once
    assert "| baseline | 0.9100 ± 0.0141 (n=2) | 0.95 | -0.0400 | 0.8000 (n=1) | aaaa1111 bbbb2222 |" in md
    assert "- baseline: poster: 400 / 100 images" in md
    assert "- second observer: A. Author, Some Journal 2006, table 3. What differs: Jaccard" in md
    html = render_html(blocks)
    assert "<td>0.9100 ± 0.0141 (n=2)</td><td>0.95</td><td>-0.0400</td>" in html
    assert "<li>dataset: jsrt-scr (real, 1234abcd)</li>" in html


def test_synthetic_rows_and_mixed_datasets_stay_labelled() -> None:
    synthetic = Row("noise", {"dice": Cell((0.5,))}, "xray-synthetic (synthetic, 99999999)", synthetic=True)
    table = _table(rows=[*_table().rows, synthetic])
    blocks = paper_blocks(table)
    assert blocks[0] == Paragraph(
        "synthetic data: these rows check the pipeline and reproduce nothing.", True
    )
    # two datasets: each row names its own
    assert table.columns()[-2:] == ["dataset", "runs"]
    assert table.body()[2][-2:] == ["xray-synthetic (synthetic, 99999999)", "-"]
    assert table.body()[3][-2:] == ["-", "-"]  # the reference row


def test_verdict_per_study() -> None:
    # baseline's dice is 0.04 below the paper's 0.95: further than 0.02
    assert _table().verdict() == (
        "not reproduced: 1 of 1 paper figures on real data further than ±0.02 from ours "
        "(largest: baseline dice -0.0400)"
    )
    close = Row("baseline", {"dice": Cell((0.94, 0.95), 0.95)})  # mean 0.945: -0.005
    assert (
        _table(rows=[close]).verdict() == "reproduced: all 1 paper figures on real data within ±0.02 of ours"
    )
    fake = Row("baseline", {"dice": Cell((0.2,), 0.95)}, synthetic=True)
    assert _table(rows=[fake]).verdict() == "synthetic only: checks the pipeline, reproduces nothing"
    assert (
        _table(rows=[Row("a", {"dice": Cell((0.2,))})]).verdict()
        == "real data, no paper figure to compare with"
    )


def test_markdown_and_html_of_each_block() -> None:
    blocks = [
        Paragraph("a | b `code`"),
        Table(["x", "y"], [["1", "a|b"]]),
        Items(["one", "two"], title="List:", links=["sec-1", None]),
    ]
    assert (
        render_markdown(blocks)
        == "a | b `code`\n\n| x | y |\n|---|---|\n| 1 | a\\|b |\n\nList:\n\n- [one](#sec-1)\n- two\n"
    )
    assert render_html(blocks) == (
        "<p>a | b <code>code</code></p>\n<table><tr><th>x</th><th>y</th></tr><tr><td>1</td><td>a|b</td></tr></table>\n"
        "<p>List:</p><ul><li><a href='#sec-1'>one</a></li><li>two</li></ul>"
    )


# --- reference rows from reproduce.yaml ----------------------------------------------------------


def test_reference_rows_require_a_citation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = {"name": "observer", "figures": {"dice": 0.9}, "citation": "X et al. 2006", "differs": "Jaccard"}
    assert load_references({"references": [good]}, "g.yaml") == [
        Reference("observer", {"dice": 0.9}, "X et al. 2006", "Jaccard")
    ]
    refusals = {
        "citation": "g.yaml: reference 'observer' has no citation: a reference row names its source (citation) "
        "and what differs from this study's scoring (differs)",
        "differs": "g.yaml: reference 'observer' has no differs: a reference row names its source (citation) "
        "and what differs from this study's scoring (differs)",
        "figures": "g.yaml: reference 'observer' has no figures (a mapping of metric to number)",
    }
    for key, message in refusals.items():
        with pytest.raises(InputError) as e:
            load_references({"references": [{k: v for k, v in good.items() if k != key}]}, "g.yaml")
        assert str(e.value) == message
    with pytest.raises(
        InputError, match=r"^g.yaml: reference 'observer': figure 'dice' is 'high', not a number$"
    ):
        load_references({"references": [dict(good, figures={"dice": "high"})]}, "g.yaml")
    with pytest.raises(InputError, match=r"^g.yaml: reference 'observer' has no citation"):
        load_references({"references": [dict(good, citation="  ")]}, "g.yaml")
    with pytest.raises(InputError, match=r"^g.yaml: reference 'observer': unknown key 'url'"):
        load_references({"references": [dict(good, url="http://x")]}, "g.yaml")

    # the grid refuses it before running anything, in one line naming its reproduce.yaml
    from medseg_monai.reproduce import main

    configs = tmp_path / "bundles" / "xray" / "configs"
    shutil.copytree(ROOT / "bundles" / "xray" / "configs", configs)
    spec = yaml.safe_load((configs / "reproduce.yaml").read_text())
    spec["references"] = [{k: v for k, v in good.items() if k != "citation"}]
    (configs / "reproduce.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    argv = [
        "--profile",
        "quick",
        "--bundles_dir",
        str(tmp_path / "bundles"),
        "--runs_dir",
        str(tmp_path / "runs"),
    ]
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {configs / 'reproduce.yaml'}: reference 'observer' has no citation: a reference row names its "
        "source (citation) and what differs from this study's scoring (differs)"
    ]
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_every_grid_reference_is_cited() -> None:
    from medseg_monai.reproduce import plan

    jobs = plan("quick", runs_dir=Path("/nonexistent"))
    lv = next(j for j in jobs if j.study == "lv")
    assert [r["name"] for r in lv.references] == ["ACDC 2017 segmentation winner (Isensee et al.)"]
    assert lv.references[0]["figures"] == {
        "dice_lv_cavity": 0.95,
        "dice_rv_cavity": 0.923,
        "dice_myocardium": 0.911,
    }
    assert {"dice_lv_cavity", "dice_myocardium", "dice_rv_cavity"} <= set(lv.metrics)  # beside ours
    assert all(r["citation"] and r["differs"] for j in jobs for r in j.references)


# a citation says where in its source the figure is
_LOCATED = re.compile(r"\b(abstract|table|tab\.|sec\.|section|fig\.|figure|page|pp?\.)", re.IGNORECASE)
# metrics that are fractions (overlaps, recalls, F-scores); the others (hd95, avd, mae, corr) are not
_FRACTIONS = ("dice", "iou", "window_", "f3", "recall", "challenge_dice", "challenge_lesion")


@pytest.mark.parametrize(
    "grid", sorted((ROOT / "bundles").glob("*/configs/reproduce.yaml")), ids=lambda p: p.parts[-3]
)
def test_every_reproduce_yaml_reference_lines_up_with_the_studys_table(grid: Path) -> None:
    """Every study's reference rows: a name, a citation that says where the figure is, what differs,
    and figures keyed by metrics the study's table shows (its grid's ``metrics``), each rendered in
    its metric's column of the paper-shaped table, '-' in the others."""
    spec = yaml.safe_load(grid.read_text())
    refs = load_references(spec, grid)  # refuses a row without name, citation, differs or figures
    metrics = list(spec["metrics"])
    for ref in refs:
        assert set(ref.figures) <= set(metrics), (
            f"{ref.name}: {set(ref.figures) - set(metrics)} not in {metrics}"
        )
        assert _LOCATED.search(ref.citation), f"{ref.name}: the citation does not say where the figure is"
        for metric, value in ref.figures.items():
            if metric.startswith(_FRACTIONS):
                assert 0 < value <= 1, f"{ref.name}: {metric} = {value} is not a fraction"
    ours = Row("baseline", {m: Cell((0.5,)) for m in metrics}, HEADER["dataset"], runs=("aaaa1111",))
    table = PaperTable(spec["study"], "quick", metrics, [ours], refs, HEADER)
    columns, body = table.columns(), table.body()
    assert [line[0] for line in body] == ["baseline"] + [f"reference: {r.name}" for r in refs]
    for ref, line in zip(refs, body[1:], strict=True):
        assert len(line) == len(columns)
        for m in metrics:
            assert line[columns.index(m)] == (f"{ref.figures[m]:g}" if m in ref.figures else "-"), (
                ref.name,
                m,
            )
    markdown = render_markdown(paper_blocks(table))
    assert all(f"reference: {r.name}" in markdown and r.citation in markdown for r in refs)


# --- figures -------------------------------------------------------------------------------------


def test_curves_are_labelled_one_per_experiment_with_the_paper_figure() -> None:
    import matplotlib.pyplot as plt

    names = [f"train_size_{n:03d}" for n in range(13)]  # more than a colour cycle holds
    curves = {n: [(1, 0.5 + i / 100), (2, 0.6 + i / 100)] for i, n in enumerate(names)}
    fig = curves_figure(curves, "val_dice", "Validation Dice per epoch", {"train_size_000": 0.99105})
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [names[0], "train_size_000: paper 0.99105", *names[1:]]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "epoch",
        "val_dice",
        "Validation Dice per epoch",
    )
    assert ax.get_legend().get_title().get_text() == "experiment"
    # 13 curves: colours from tab20, no two alike
    colours = [line.get_color() for line in ax.get_lines() if line.get_label() in names]
    assert len({tuple(c) if not isinstance(c, str) else c for c in colours}) == 13
    plt.close(fig)


def test_sweep_has_a_band_over_seeds() -> None:
    import matplotlib.pyplot as plt

    # x = 5: seeds 0.8 and 0.9 (mean 0.85, sd 0.0707); x = 10: 0.9 and 0.94 (mean 0.92, sd 0.0283)
    points = [(5, 0.8), (5, 0.9), (10, 0.9), (10, 0.94)]
    fig = sweep_figure(points, "n_train", "dice", "Dice vs training-set size", {5: 0.98667})
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["ours (mean over seeds)", "ours ± 1 sd over seeds", "each seed", "paper"]
    band = ax.collections[0].get_paths()[0].vertices
    assert min(band[:, 1]) == pytest.approx(0.85 - 0.0707107, abs=1e-6)
    assert max(band[:, 1]) == pytest.approx(0.92 + 0.0282843, abs=1e-6)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("n_train", "dice")
    plt.close(fig)


def test_per_case_boxes_name_each_experiment() -> None:
    import matplotlib.pyplot as plt

    from medseg_monai.report import cases_figure

    fig = cases_figure({"baseline": [0.1, 0.2, 0.6], "t1": [0.5]}, "dice", "xray: dice per case")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["baseline", "t1"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "experiment",
        "dice per case",
        "xray: dice per case",
    )
    # every case a point, spread sideways within its box: baseline at 0.85, 1.0, 1.15; t1 at 2
    points = [float(v) for c in ax.collections for xy in c.get_offsets() for v in xy]
    assert points == pytest.approx([0.85, 0.1, 1.0, 0.2, 1.15, 0.6, 2.0, 0.5])
    plt.close(fig)


# --- the report from an MLflow store -------------------------------------------------------------


def _grid_run(
    client: Any, experiment_id: str, variant: str, seed: int, order: int, dice: float, **tags: str
) -> str:
    all_tags = {
        "reproduce.status": "complete",
        "reproduce.profile": "quick",
        "reproduce.split": "val",
        "reproduce.metrics": "dice,dice_heart",
        "reproduce.order": str(order),
        "reproduce.figures": json.dumps(
            [{"kind": "curves", "title": "Validation Dice per epoch", "metric": "val_dice"}]
        ),
        "reproduce.references": json.dumps([asdict(OBSERVER)]),
        "dataset.id": "xray-synthetic",
        "dataset.kind": "synthetic",
        "dataset.hash": "0123456789",
        "git.commit": "feedbeef00",
        "git.dirty": "false",
        "device": "cpu (2 cores)",
        "variant": variant,
        "seed": str(seed),
        **tags,
    }
    run_id = client.create_run(experiment_id, tags=all_tags).info.run_id
    client.log_metric(run_id, "eval_val_dice", dice)
    for epoch, value in enumerate((dice - 0.2, dice - 0.1, dice), 1):
        client.log_metric(run_id, "val_dice", value, step=epoch)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_report_from_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg_monai.report import build_report
    from medseg_monai.tracking import ensure_experiment, open_client

    monkeypatch.setenv("MEDSEG_MLFLOW_DIR", str(tmp_path / "mlflow"))
    client = open_client()
    xray = ensure_experiment("xray", client)
    _grid_run(client, xray, "cpu_real", 0, 2, 0.70)  # first in time, last in the grid
    _grid_run(client, xray, "noise_val_only", 0, 0, 0.60, **{"paper.dice": "0.6648"})
    _grid_run(client, xray, "baseline", 0, 1, 0.80, **{"paper.dice": "0.99"})
    _grid_run(client, xray, "baseline", 1, 1, 0.90, **{"paper.dice": "0.99"})
    report = build_report(tmp_path / "reports").read_text()
    assert (
        "- [xray (quick profile): synthetic only: checks the pipeline, reproduces nothing](#xray-quick-profile)"
        in report
    )
    part = report.split("## xray (quick profile)")[1]
    assert part.count("- hardware: cpu (2 cores)\n") == 1 and "- commit: feedbeef\n" in part
    assert "- dataset: xray-synthetic (synthetic, 01234567)\n" in part
    rows = [line.split(" | ")[0] for line in part.splitlines() if "(n=" in line or "reference:" in line]
    # the baseline first, then the grid's order; the reference row last
    assert rows == ["| baseline", "| noise_val_only", "| cpu_real", "| reference: second observer"]
    # baseline: 0.80 and 0.90, mean 0.85, sd sqrt(0.005) = 0.0707, 0.85 - 0.99 = -0.14
    assert "| baseline | 0.8500 ± 0.0707 (n=2) | 0.99 | -0.1400 | - |" in part
    assert "| reference: second observer | - | - | - | 0.878 | - |" in part
    assert "- second observer: A. Author, Some Journal 2006, table 3. What differs: Jaccard" in part
    assert "![Validation Dice per epoch](figures/xray-quick-0.png)" in part
    assert (tmp_path / "reports" / "figures" / "xray-quick-0.png").read_bytes().startswith(b"\x89PNG")
    html = (tmp_path / "reports" / "report.html").read_text()
    # the page opens on the summary, linked to each study's section
    assert html.index("<h2 id='summary'>Summary</h2>") < html.index("<h2 id='xray-quick-profile'>")
    assert (
        "<a href='#xray-quick-profile'>" in html
        and "<figcaption>Validation Dice per epoch</figcaption>" in html
    )
