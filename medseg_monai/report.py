"""The reproduction report, rebuilt from the MLflow store alone (``make report``).

For every study (MLflow experiment) and profile: a line naming the split each row is scored on
(the grid's ``split``: a test split, or the validation split that also chose each ``model.pt``),
then a table with, per experiment, the paper's number, ours as mean +- sd over seeds, n, the
dataset (id, real or synthetic, content hash) and the run ids; where the study has an experiment named
``baseline``, every other experiment against it case by case (``medseg_monai.compare.versus_baseline``:
mean difference, bootstrap interval, Holm-corrected Wilcoxon p, verdict); then the figures the bundle asked for (validation curves, sweeps, lesion brackets)
and the failed runs; then a section per hyperparameter search (``medseg_monai.search``) with its
trajectory. Writes ``report.md`` and a self-contained ``report.html`` (figures inlined)
to ``<mlflow dir>/reports``.

    python -m medseg_monai.report [--output_dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from medseg_monai.errors import redact
from medseg_monai.tracking import mlflow_dir, open_client, tracking_uri

__all__ = ["build_report", "collect", "main", "split_sentence"]

SYNTHETIC_NOTE = "synthetic data: these rows check the pipeline and reproduce nothing"
# what a figure on each evaluation split is worth: model.pt is the epoch of best validation score
SPLITS = {
    "test": "the test split (cases that neither trained the model nor chose its checkpoint)",
    "val": "the validation split (the cases that chose model.pt, its best epoch: a flattering figure)",
    "train": "the training split (cases the model trained on)",
    "all": "every case (the training cases included)",
}


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


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


def split_sentence(splits: dict[str, str]) -> str:
    """The line above a table saying which split its rows are scored on: ``splits`` maps each
    experiment to its split; the most common one is named first, the others with their rows."""
    by_split: dict[str, list[str]] = defaultdict(list)
    for name, split in sorted(splits.items()):
        by_split[split].append(name)
    ordered = sorted(by_split, key=lambda s: -len(by_split[s]))
    parts = [f"Scored on {SPLITS.get(ordered[0], f'the {ordered[0]} split')}"]
    parts += [f"{', '.join(by_split[s])} on {SPLITS.get(s, f'the {s} split')}" for s in ordered[1:]]
    return "; ".join(parts) + "."


def _latest_per_seed(runs: list[Any]) -> list[Any]:
    """One run per seed (the newest), so reruns do not count twice."""
    by_seed = {r.data.tags.get("seed", r.info.run_id): r for r in runs}
    return list(by_seed.values())


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _figure(client: Any, spec: dict[str, Any], variants: dict[str, list[Any]]) -> tuple[str, bytes] | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if spec["kind"] == "curves":
        for name, runs in sorted(variants.items()):
            histories = [
                sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, spec["metric"]))
                for r in runs
            ]
            steps = sorted({s for h in histories for s, _ in h})
            if not steps:
                continue
            means = [statistics.mean(v for h in histories for s2, v in h if s2 == s) for s in steps]
            ax.plot(steps, means, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(spec["metric"])
        if len(variants) <= 12:
            ax.legend(fontsize=7)
    elif spec["kind"] == "sweep":
        points = []
        for runs in variants.values():
            for r in runs:
                split = r.data.tags.get("reproduce.split", "val")
                y = r.data.metrics.get(f"eval_{split}_{spec['y']}")
                x = r.data.params.get(spec["x"])
                if y is not None and x is not None:
                    points.append((float(x), y))
        if not points:
            plt.close(fig)
            return None
        xs = sorted({x for x, _ in points})
        ax.plot(
            xs,
            [statistics.mean(y for x2, y in points if x2 == x) for x in xs],
            "o-",
            label="ours (mean over seeds)",
        )
        ax.scatter([x for x, _ in points], [y for _, y in points], s=10, alpha=0.4)
        paper = {float(k): float(v) for k, v in (spec.get("paper") or {}).items()}
        if paper:
            ax.plot(list(paper), list(paper.values()), "r*", markersize=12, label="paper")
        ax.set_xlabel(spec["x"])
        ax.set_ylabel(spec["y"])
        ax.legend(fontsize=8)
    elif spec["kind"] == "bars":
        names = sorted(variants)
        keys = spec["metrics"]
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            runs = variants[name]
            split = runs[0].data.tags.get("reproduce.split", "val")
            values = [
                statistics.mean(r.data.metrics.get(f"eval_{split}_{k}", math.nan) for r in runs) for k in keys
            ]
            ax.bar([j + i * width for j in range(len(keys))], values, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, rotation=20, fontsize=7)
        ax.legend(fontsize=6)
    else:
        plt.close(fig)
        return None
    ax.set_title(spec.get("title", ""))
    ax.grid(alpha=0.3)
    data = _png(fig)
    plt.close(fig)
    return spec.get("title", spec["kind"]), data


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


def _search_sections(client: Any, out: Path, md: list[str], parts_html: list[str]) -> None:
    """One section per hyperparameter search (a parent run tagged ``search.role``, its trials the
    child runs): what was searched, the best trial, and the trajectory drawn from the children's
    ``search.score``, appended to ``md`` and ``parts_html``; the figure goes to ``out/figures``."""
    from medseg_monai.search import plot_trajectory

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
            md += [f"## Hyperparameter search: {title}", "", text, ""]
            parts_html += [
                f"<h2>Hyperparameter search: {html.escape(title)}</h2>",
                f"<p>{html.escape(text)}</p>",
            ]
            if not points:
                continue
            png = plot_trajectory(points, metric, direction, title)
            figure = f"search-{exp.name}-{profile}-{name}.png".replace("/", "_")
            (out / "figures" / figure).write_bytes(png)
            md += [f"![{title}](figures/{figure})", ""]
            parts_html.append(
                f"<img alt='{html.escape(title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>"
            )


def _baseline_statistics(
    client: Any, study: str, variants: dict[str, list[Any]]
) -> tuple[list[str], list[str]]:
    """Markdown and HTML of a study's experiments against its ``baseline``, paired per case on the
    headline metric (``medseg_monai.compare.versus_baseline``; ``docs/statistics.md``); nothing when
    the study has no experiment named ``baseline``."""
    from medseg_monai.compare import versus_baseline
    from medseg_monai.stats import Paired, lower_is_better

    metric, rows = versus_baseline(client, variants, study)
    if metric is None:
        text = [f"No paired statistics: {name}: {why}" for name, why in rows]
        return [*text, ""] if text else [], [f"<p>{html.escape(t)}</p>" for t in text]
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
    md = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in table] + [""]
    parts = [
        f"<p>{html.escape(title)}</p><table><tr>"
        + "".join(f"<th>{h}</th>" for h in header)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table)
        + "</table>"
    ]
    return md, parts


def build_report(output_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png``; returns the Markdown path."""
    client = open_client()
    out = Path(output_dir) if output_dir else mlflow_dir() / "reports"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    groups = collect(client)
    figures: dict[tuple[str, str], list[Path]] = {}
    md = ["# Reproduction report", "", f"From MLflow store `{redact(tracking_uri())}`.", ""]
    parts_html = [
        "<h1>Reproduction report</h1>",
        f"<p>From MLflow store <code>{html.escape(redact(tracking_uri()))}</code>.</p>",
    ]
    if not groups:
        md.append("No reproduction runs yet: run `make reproduce-all`.")
        parts_html.append("<p>No reproduction runs yet: run <code>make reproduce-all</code>.</p>")
    for (study, profile), group in sorted(groups.items()):
        variants = {k: _latest_per_seed(v) for k, v in group["variants"].items()}
        md += [f"## {study} ({profile} profile)", ""]
        parts_html.append(f"<h2>{html.escape(study)} ({html.escape(profile)} profile)</h2>")
        header = ["experiment", "metric", "paper", "ours (mean ± sd)", "n", "dataset", "runs"]
        rows, synthetic, splits = [], False, {}
        for name, runs in sorted(variants.items()):
            tags = runs[0].data.tags
            split = splits[name] = tags.get("reproduce.split", "val")
            metrics = {k[len("paper.") :] for k in tags if k.startswith("paper.")}
            metrics |= set(filter(None, tags.get("reproduce.metrics", "dice").split(",")))
            kind = tags.get("dataset.kind", "?")
            synthetic |= kind == "synthetic"
            dataset = f"{tags.get('dataset.id', '?')} ({kind}, {tags.get('dataset.hash', '?')[:8]})"
            for metric in sorted(metrics):
                values = [
                    r.data.metrics[f"eval_{split}_{metric}"]
                    for r in runs
                    if f"eval_{split}_{metric}" in r.data.metrics
                ]
                paper = tags.get(f"paper.{metric}", "-")
                if not values and paper == "-":  # a metric of another label set (e.g. BraTS 2015's classes)
                    continue
                run_ids = " ".join(r.info.run_id[:8] for r in runs)
                rows.append(
                    [name, f"{split} {metric}", paper, _mean_sd(values), str(len(values)), dataset, run_ids]
                )
        if synthetic:
            md += [f"> {SYNTHETIC_NOTE}.", ""]
            parts_html.append(f"<p><strong>{html.escape(SYNTHETIC_NOTE)}.</strong></p>")
        if splits:
            md += [split_sentence(splits), ""]
            parts_html.append(f"<p>{html.escape(split_sentence(splits))}</p>")
        md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        md.append("")
        # where the paper column is empty the grid's notes say why (e.g. a draft without results)
        notes = [
            (name, runs[0].data.tags.get("reproduce.note", "")) for name, runs in sorted(variants.items())
        ]
        notes = [(name, note) for name, note in notes if note]
        if notes:
            md += ["Notes:", ""] + [f"- {name}: {note}" for name, note in notes] + [""]
            parts_html.append(
                "<p>Notes:</p><ul>"
                + "".join(f"<li>{html.escape(n)}: {html.escape(t)}</li>" for n, t in notes)
                + "</ul>"
            )
        parts_html.append(
            "<table><tr>"
            + "".join(f"<th>{h}</th>" for h in header)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>"
        )
        stats_md, stats_html = _baseline_statistics(client, study, variants)
        md += stats_md
        parts_html += stats_html
        specs = (
            json.loads(next(iter(variants.values()))[0].data.tags.get("reproduce.figures", "[]"))
            if variants
            else []
        )
        for i, spec in enumerate(specs):
            made = _figure(client, spec, variants)
            if made is None:
                continue
            title, png = made
            name = f"{study}-{profile}-{i}.png"
            (out / "figures" / name).write_bytes(png)
            figures.setdefault((study, profile), []).append(out / "figures" / name)
            md += [f"![{title}](figures/{name})", ""]
            parts_html.append(
                f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' "
                f"src='data:image/png;base64,{base64.b64encode(png).decode()}'/>"
            )
        if group["failed"]:
            md += ["Failed runs:", ""]
            parts_html.append("<h3>Failed runs</h3><ul>")
            for run in group["failed"]:
                tags = run.data.tags
                error = tags.get("reproduce.error", run.info.status).strip().splitlines()[-1:] or [
                    run.info.status
                ]
                line = f"{tags.get('variant', run.info.run_name)} seed {tags.get('seed', '?')} ({run.info.run_id[:8]}): {error[0][:300]}"
                md.append(f"- {line}")
                parts_html.append(f"<li>{html.escape(line)}</li>")
            md.append("")
            parts_html.append("</ul>")
    _search_sections(client, out, md, parts_html)
    (out / "report.md").write_text("\n".join(md))
    _log_figures(client, figures)
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}"
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>Reproduction report</title><style>{style}</style></head><body>"
        + "\n".join(parts_html)
        + "</body></html>"
    )
    return out / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medseg-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", help="default: <mlflow dir>/reports")
    args = parser.parse_args(argv)
    print(build_report(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
