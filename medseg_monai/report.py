"""The reproduction report, rebuilt from the MLflow store alone (``make report``).

It opens on a summary, one line per study and profile (reproduced, not reproduced, synthetic
only) linking to the study's section. Each section: the paper-shaped table
(``medseg_monai.tables``: experiments in the paper's order, the baseline first, per metric ours as
mean ± sd over seeds with n beside the paper's figure and the difference, labelled reference rows
with their citations, and dataset, split, commit, date, hardware and profile once above it), the
grid's notes; where the study has an experiment named ``baseline``, every other experiment against
it case by case (``medseg_monai.compare.versus_baseline``: mean difference, bootstrap interval,
Holm-corrected Wilcoxon p, verdict); each experiment's per-case values of the headline metric (box
and points); the figures the grid asked for (validation curves, one labelled curve per experiment,
sweeps with their spread over seeds, lesion brackets) and the failed runs.
Then a section per hyperparameter search (``medseg_monai.search``) with its trajectory. The report
is one document model (sections of paragraphs, tables, lists and figures) rendered twice:
``report.md`` and a self-contained ``report.html`` (figures inlined), in ``<mlflow dir>/reports``.

    python -m medseg_monai.report [--output_dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg_monai.compare import headline_metric, mlflow_cases, versus_baseline
from medseg_monai.errors import InputError, redact
from medseg_monai.stats import Paired, lower_is_better, seed_average
from medseg_monai.tables import PaperTable, paper_table, split_sentence
from medseg_monai.tracking import mlflow_dir, open_client, tracking_uri

__all__ = [
    "Image",
    "Items",
    "Paragraph",
    "Section",
    "Table",
    "bars_figure",
    "build_report",
    "cases_figure",
    "collect",
    "curves_figure",
    "main",
    "paper_blocks",
    "render_html",
    "render_markdown",
    "split_sentence",
    "sweep_figure",
]

SYNTHETIC_NOTE = "synthetic data: these rows check the pipeline and reproduce nothing"
_STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;display:block;overflow-x:auto}"
    "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;white-space:nowrap}"
    "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}"
)


# ----------------------------------------------------------------------------- the document model


@dataclass
class Paragraph:
    text: str
    strong: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Items:
    """A bullet list, with an optional title line; ``links`` (one per item, or None) are anchors."""

    items: list[str]
    title: str = ""
    links: list[str | None] | None = None


@dataclass
class Image:
    title: str
    file: str  # relative to the report, e.g. figures/xray-quick-0.png
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list[Any] = field(default_factory=list)
    level: int = 2

    @property
    def anchor(self) -> str:
        """GitHub's heading anchor, so the Markdown links work there and in the HTML alike."""
        return re.sub(r"[^a-z0-9 _-]", "", self.title.lower()).strip().replace(" ", "-")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(blocks: Sequence[Any]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Section):
            out += [f"{'#' * block.level} {block.title}", "", render_markdown(block.blocks)]
        elif isinstance(block, Paragraph):
            out += [f"**{block.text}**" if block.strong else block.text, ""]
        elif isinstance(block, Table):
            out += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows] + [""]
        elif isinstance(block, Items):
            links = block.links or [None] * len(block.items)
            out += [block.title, ""] if block.title else []
            out += [f"- [{t}](#{a})" if a else f"- {t}" for t, a in zip(block.items, links, strict=True)]
            out.append("")
        elif isinstance(block, Image):
            out += [f"![{block.title}]({block.file})", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def render_html(blocks: Sequence[Any]) -> str:
    out: list[str] = []
    esc = _inline
    for block in blocks:
        if isinstance(block, Section):
            level = min(block.level, 6)
            out.append(f"<h{level} id='{block.anchor}'>{esc(block.title)}</h{level}>")
            out.append(render_html(block.blocks))
        elif isinstance(block, Paragraph):
            out.append(
                f"<p><strong>{esc(block.text)}</strong></p>" if block.strong else f"<p>{esc(block.text)}</p>"
            )
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows
            )
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif isinstance(block, Items):
            links = block.links or [None] * len(block.items)
            items = "".join(
                f"<li><a href='#{a}'>{esc(t)}</a></li>" if a else f"<li>{esc(t)}</li>"
                for t, a in zip(block.items, links, strict=True)
            )
            out.append((f"<p>{esc(block.title)}</p>" if block.title else "") + f"<ul>{items}</ul>")
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode()
            out.append(
                f"<figure><img alt='{html.escape(block.title)}' src='data:image/png;base64,{data}'/>"
                f"<figcaption>{esc(block.title)}</figcaption></figure>"
            )
    return "\n".join(out)


def _page(blocks: Sequence[Any]) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Reproduction report</title>"
        f"<style>{_STYLE}</style></head><body>\n{render_html(blocks)}\n</body></html>"
    )


# ----------------------------------------------------------------------------- MLflow queries


def collect(client: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Reproduction runs grouped by (study, profile): {"variants": {name: [runs]}, "failed": [...]}"""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for exp in client.search_experiments():
        runs = client.search_runs(
            [exp.experiment_id], filter_string="tags.`reproduce.status` != ''", max_results=5000
        )
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            tags = run.data.tags
            key = (exp.name, tags.get("reproduce.profile", tags.get("profile", "default")))
            group = groups.setdefault(key, {"variants": defaultdict(list), "failed": []})
            if tags.get("reproduce.status") == "complete" and run.info.status == "FINISHED":
                group["variants"][tags.get("variant", run.info.run_name)].append(run)
            else:
                group["failed"].append(run)
    return groups


def _latest_per_seed(runs: list[Any]) -> list[Any]:
    """One run per seed (the newest), so reruns do not count twice."""
    by_seed = {r.data.tags.get("seed", r.info.run_id): r for r in runs}
    return list(by_seed.values())


# ----------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _legend(ax: Any, count: int, title: str = "experiment") -> None:
    """Outside the plot on the right, so a dozen curves leave the data readable."""
    ax.legend(title=title, fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              ncol=1 if count <= 18 else 2)  # fmt: skip


def curves_figure(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    metric: str,
    title: str,
    paper: Mapping[str, float] | None = None,
) -> Any:
    """One labelled curve per experiment (mean over seeds per epoch), and the paper's figure of an
    experiment, where it has one, as a dotted line of the same colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.4, 4.0))
    cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    paper = paper or {}
    for i, (name, points) in enumerate(curves.items()):
        color, style = cmap(i % cmap.N), ("-", "--", "-.")[(i // cmap.N) % 3]
        ax.plot([s for s, _ in points], [v for _, v in points], style, color=color, lw=1.4, label=name)
        if name in paper:
            ax.axhline(paper[name], color=color, ls=":", lw=1.2, label=f"{name}: paper {paper[name]:g}")
    ax.set(xlabel="epoch", ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    _legend(ax, len(curves) + len(paper))
    return fig


def sweep_figure(
    points: Sequence[tuple[float, float]],
    x: str,
    y: str,
    title: str,
    paper: Mapping[float, float] | None = None,
) -> Any:
    """The metric against a swept parameter: the mean over seeds, a band of ± 1 sd where several
    seeds ran, each seed's point, and the paper's points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.4, 4.0))
    by_x: dict[float, list[float]] = defaultdict(list)
    for px, py in points:
        by_x[px].append(py)
    xs = sorted(by_x)
    means = [statistics.mean(by_x[v]) for v in xs]
    ax.plot(xs, means, "o-", label="ours (mean over seeds)")
    if any(len(by_x[v]) > 1 for v in xs):
        sds = [statistics.stdev(by_x[v]) if len(by_x[v]) > 1 else 0.0 for v in xs]
        ax.fill_between(xs, [m - s for m, s in zip(means, sds, strict=True)],
                        [m + s for m, s in zip(means, sds, strict=True)], alpha=0.2, label="ours ± 1 sd over seeds")  # fmt: skip
    ax.scatter([px for px, _ in points], [py for _, py in points], s=10, alpha=0.4, label="each seed")
    if paper:
        ax.plot(list(paper), list(paper.values()), "r*", markersize=12, label="paper")
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.grid(alpha=0.3)
    _legend(ax, 4, title="")
    return fig


def bars_figure(values: Mapping[str, Sequence[float]], metrics: Sequence[str], title: str) -> Any:
    """Grouped bars: per metric, one bar per experiment (the mean over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.4, 4.0))
    width = 0.8 / max(len(values), 1)
    for i, (name, row) in enumerate(values.items()):
        ax.bar([j + i * width for j in range(len(metrics))], row, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=20, fontsize=7)
    ax.set(xlabel="metric", ylabel="mean over seeds", title=title)
    ax.grid(alpha=0.3, axis="y")
    _legend(ax, len(values))
    return fig


def cases_figure(values: Mapping[str, Sequence[float]], metric: str, title: str) -> Any:
    """Per experiment, its per-case values: a box (quartiles, whiskers to 1.5 IQR) and every case
    as a point, spread sideways so that ties stay visible."""
    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 2.0), 4.0))
    ax.boxplot([values[n] for n in names], showfliers=False)
    for i, name in enumerate(names, 1):
        count = len(values[name])
        xs = [i + (0.3 * (k / (count - 1) - 0.5) if count > 1 else 0.0) for k in range(count)]
        ax.scatter(xs, values[name], s=9, alpha=0.5, color="tab:blue", zorder=3)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=7)
    ax.set(xlabel="experiment", ylabel=f"{metric} per case", title=title)
    ax.grid(alpha=0.3, axis="y")
    return fig


def _case_values(
    client: Any, study: str, variants: Mapping[str, Sequence[Any]]
) -> tuple[str, dict[str, list[float]]]:
    """The headline metric's per-case values of each experiment (seeds averaged per case) from the
    runs' metrics.json; an experiment without them, or without that metric, is left out."""
    metric, out = headline_metric(study) or "dice", {}
    base_split = next(iter(variants.values()))[0].data.tags.get("reproduce.split", "val")
    for name, runs in variants.items():
        try:
            seeds = {}
            for run in runs:
                cases = mlflow_cases(client, run, False)[0]
                seeds[run.data.tags.get("seed", run.info.run_id)] = {c: v[metric] for c, v in cases.items()}
            scores = [v for v in seed_average(seeds).values() if not math.isnan(v)]
        except (InputError, OSError, KeyError, TypeError, ValueError):
            continue
        split = runs[0].data.tags.get("reproduce.split", "val")
        if scores:
            out[name if split == base_split else f"{name} ({split})"] = scores
    return metric, out


def _figure(client: Any, spec: dict[str, Any], variants: dict[str, list[Any]], names: list[str]) -> Any:
    """The figure a grid asked for (``figures`` of its reproduce.yaml), drawn from the runs in
    ``names``' order; None when there is nothing to draw."""
    title = spec.get("title", spec["kind"])
    if spec["kind"] == "curves":
        curves, paper = {}, {}
        for name in names:
            histories = [client.get_metric_history(r.info.run_id, spec["metric"]) for r in variants[name]]
            by_step: dict[int, list[float]] = defaultdict(list)
            for m in (m for h in histories for m in h):
                by_step[m.step].append(m.value)
            if by_step:
                curves[name] = [(s, statistics.mean(by_step[s])) for s in sorted(by_step)]
            quoted = variants[name][0].data.tags.get(f"paper.{spec['metric'].removeprefix('val_')}")
            if quoted is not None and name in curves:
                paper[name] = float(quoted)
        return curves_figure(curves, spec["metric"], title, paper) if curves else None
    if spec["kind"] == "sweep":
        points = []
        for name in names:
            for r in variants[name]:
                y = r.data.metrics.get(f"eval_{r.data.tags.get('reproduce.split', 'val')}_{spec['y']}")
                x = r.data.params.get(spec["x"])
                if y is not None and x is not None:
                    points.append((float(x), y))
        paper = {float(k): float(v) for k, v in (spec.get("paper") or {}).items()}
        return sweep_figure(points, spec["x"], spec["y"], title, paper) if points else None
    if spec["kind"] == "bars":
        values = {}
        for name in names:
            split = variants[name][0].data.tags.get("reproduce.split", "val")
            values[name] = [
                statistics.mean(r.data.metrics.get(f"eval_{split}_{k}", math.nan) for r in variants[name])
                for k in spec["metrics"]
            ]
        return bars_figure(values, spec["metrics"], title)
    return None


def _log_figures(client: Any, figures: dict[tuple[str, str], list[Path]]) -> None:
    """Put each study's report figures (e.g. Dice vs training-set size) into MLflow too: one run
    per (study, profile) named ``report (<profile>)``, reused and refreshed at every rebuild."""
    for (study, profile), paths in figures.items():
        exp = client.get_experiment_by_name(study)
        query = f"tags.`reproduce.report` = '{profile}'"
        found = client.search_runs([exp.experiment_id], filter_string=query, max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {"mlflow.runName": f"report ({profile})", "reproduce.report": profile, "profile": profile}
            run_id = client.create_run(exp.experiment_id, tags=tags).info.run_id
            client.set_terminated(run_id, "FINISHED")
        for path in paths:
            client.log_artifact(run_id, str(path), artifact_path="figures")


# ----------------------------------------------------------------------------- sections


def paper_blocks(table: PaperTable) -> list[Any]:
    """A study's paper-shaped table as blocks: the synthetic label, the header said once, the
    table, the grid's notes and the references' citations."""
    blocks: list[Any] = [Paragraph(f"{SYNTHETIC_NOTE}.", strong=True)] if table.synthetic else []
    blocks += [Items([f"{k}: {v}" for k, v in table.header.items()]), Table(table.columns(), table.body())]
    # where the paper column is empty the grid's notes say why (e.g. a draft without results)
    notes = [f"{r.name}: {r.note}" for r in table.rows if r.note]
    if notes:
        blocks.append(Items(notes, title="Notes:"))
    if table.references:
        refs = [f"{r.name}: {r.citation}. What differs: {r.differs}" for r in table.references]
        blocks.append(Items(refs, title="References (labelled rows, not our runs):"))
    return blocks


def _baseline_statistics(client: Any, study: str, variants: dict[str, list[Any]]) -> list[Any]:
    """A study's experiments against its ``baseline``, paired per case on the headline metric
    (``medseg_monai.compare.versus_baseline``; ``docs/statistics.md``); nothing when the study has
    no experiment named ``baseline``."""
    metric, rows = versus_baseline(client, variants, study)
    if metric is None:
        return [Paragraph(f"No paired statistics: {name}: {why}") for name, why in rows]
    title = (
        f"Against the baseline, case by case: {metric}, experiment - baseline "
        f"({'lower' if lower_is_better(metric) else 'higher'} is better), seeds averaged per case, 95 % "
        "bootstrap CI, Wilcoxon p Holm-corrected across the experiments (docs/statistics.md)."
    )
    both = "(experiment / baseline)"
    header = ["experiment", "cases", f"seeds {both}", "difference (95 % CI)", "p", "Holm p", "verdict"]
    header.append(f"seed sd {both}")
    table = []
    for name, r in rows:
        if not isinstance(r, Paired):
            table.append([name, "-", "-", "-", "-", "-", f"not compared: {r}", "-"])
            continue
        seed_sd = " / ".join("-" if v is None else f"{v:.4f}" for v in (r.a.seed_sd, r.b.seed_sd))
        low, high = r.ci
        difference = f"{r.mean_difference:+.4f} [{low:+.4f}, {high:+.4f}]"
        counts = [str(len(r.cases)), f"{r.a.seeds} / {r.b.seeds}"]
        table.append([name, *counts, difference, f"{r.p_value:.3g}", f"{r.p_holm:.3g}", r.verdict, seed_sd])
    return [Paragraph(title), Table(header, table)]


def _failed(runs: list[Any]) -> Items:
    lines = []
    for run in runs:
        tags = run.data.tags
        error = tags.get("reproduce.error", run.info.status).strip().splitlines()[-1:] or [run.info.status]
        name = tags.get("variant", run.info.run_name)
        lines.append(f"{name} seed {tags.get('seed', '?')} ({run.info.run_id[:8]}): {error[0][:300]}")
    return Items(lines, title="Failed runs:")


def _search_sections(client: Any, out: Path) -> list[Section]:
    """One section per hyperparameter search (a parent run tagged ``search.role``, its trials the
    child runs): what was searched, the best trial, and the trajectory drawn from the children's
    ``search.score``; the figure goes to ``out/figures``."""
    from medseg_monai.search import plot_trajectory  # lazy: it imports optuna, which only searches need

    sections = []
    for exp in client.search_experiments():
        parents = client.search_runs([exp.experiment_id], "tags.`search.role` = 'parent'", max_results=500)
        for parent in sorted(parents, key=lambda r: r.info.start_time or 0):
            tags, pid = parent.data.tags, parent.info.run_id
            children = client.search_runs(
                [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'", max_results=5000
            )
            points = [
                {
                    "number": int(c.data.tags.get("search.trial", -1)),
                    "score": c.data.metrics.get("search.score"),
                    "params": json.loads(c.data.tags.get("search.params", "{}")),
                }
                for c in children
                if "search.trial" in c.data.tags
            ]
            name, profile = tags.get("search.name", "?"), tags.get("profile", "?")
            metric, direction = tags.get("search.metric", "score"), tags.get("search.direction", "maximize")
            done = [p for p in points if p["score"] is not None]
            title = f"{exp.name} search '{name}' ({profile})"
            text = (
                f"{len(done)} of {tags.get('search.trials', '?')} trials complete ({len(points) - len(done)} "
                f"failed or interrupted), {tags.get('search.steps', '?')} steps each, {metric} ({direction}); "
            )
            if done:
                best = (max if direction == "maximize" else min)(done, key=lambda p: p["score"])
                shown = ", ".join(f"{k}={v:.4g}" for k, v in best["params"].items())
                text += f"best {best['score']:.4f} in trial {best['number']} ({shown}); "
            kinds = {c.data.tags.get("dataset.kind") for c in children} - {None}
            text += f"MLflow run {pid[:8]}" + (" (synthetic data)" if "synthetic" in kinds else "") + "."
            section = Section(f"Hyperparameter search: {title}", [Paragraph(text)])
            sections.append(section)
            if not points:
                continue
            png = plot_trajectory(points, metric, direction, title)
            figure = f"search-{exp.name}-{profile}-{name}.png".replace("/", "_")
            (out / "figures" / figure).write_bytes(png)
            section.blocks.append(Image(title, f"figures/{figure}", png))
    return sections


def build_report(output_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png``; returns the Markdown path."""
    client = open_client()
    out = Path(output_dir) if output_dir else mlflow_dir() / "reports"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures: dict[tuple[str, str], list[Path]] = {}
    summary: list[str] = []
    studies: list[Section] = []
    for (study, profile), group in sorted(collect(client).items()):
        variants = {k: _latest_per_seed(v) for k, v in group["variants"].items()}
        section = Section(f"{study} ({profile} profile)")
        if variants:
            table = paper_table(study, profile, variants)
            names = [r.name for r in table.rows]
            variants = {n: variants[n] for n in names}  # the paper's order, the baseline first
            summary.append(f"{study} ({profile} profile): {table.verdict()}")
            section.blocks += paper_blocks(table)
            section.blocks += _baseline_statistics(client, study, variants)
            metric, cases = _case_values(client, study, variants)
            if cases:
                split = variants[names[0]][0].data.tags.get("reproduce.split", "val")
                title = f"{study}: {metric} per case, {split} split (seeds averaged per case)"
                png, path = (
                    _png(cases_figure(cases, metric, title)),
                    out / "figures" / f"{study}-{profile}-cases.png",
                )
                path.write_bytes(png)
                figures.setdefault((study, profile), []).append(path)
                section.blocks.append(Image(title, f"figures/{path.name}", png))
            specs = json.loads(variants[names[0]][0].data.tags.get("reproduce.figures", "[]"))
            for i, spec in enumerate(specs):
                fig = _figure(client, spec, variants, names)
                if fig is None:
                    continue
                png, path = _png(fig), out / "figures" / f"{study}-{profile}-{i}.png"
                path.write_bytes(png)
                figures.setdefault((study, profile), []).append(path)
                section.blocks.append(Image(spec.get("title", spec["kind"]), f"figures/{path.name}", png))
        else:
            summary.append(f"{study} ({profile} profile): no finished run")
        if group["failed"]:
            section.blocks.append(_failed(group["failed"]))
        studies.append(section)
    store = Paragraph(f"From MLflow store `{redact(tracking_uri())}`.")
    if studies:
        links: list[str | None] = [s.anchor for s in studies]
        head = Section("Summary", [Items(summary, links=links)])
    else:
        head = Section("Summary", [Paragraph("No reproduction runs yet: run `make reproduce-all`.")])
    document = [
        Section("Reproduction report", [store], level=1),
        head,
        *studies,
        *_search_sections(client, out),
    ]
    (out / "report.md").write_text(render_markdown(document))
    _log_figures(client, figures)
    (out / "report.html").write_text(_page(document))
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medseg-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", help="default: <mlflow dir>/reports")
    args = parser.parse_args(argv)
    try:
        print(build_report(args.output_dir))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
