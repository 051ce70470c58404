"""The paper-shaped table of one study, the report's table model (``medseg_monai.report`` renders it).

One table per (study, profile): rows are the grid's experiments in the grid's order (the paper's,
``configs/reproduce.yaml``), the baseline first, then the labelled reference rows of the grid's
``references`` (a human ceiling or a published state of the art, each with its citation); columns
are the grid's metrics, each cell ours (mean ± sd over seeds, n) with, where any row has a paper
figure for that metric, the paper's figure and ours minus the paper's. What every row shares
(dataset, split, commit, date, hardware, profile) is the table's header, said once.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medseg_monai.errors import InputError

__all__ = [
    "REPRODUCED_WITHIN",
    "SPLITS",
    "Cell",
    "PaperTable",
    "Reference",
    "Row",
    "load_references",
    "paper_table",
    "split_sentence",
]

# what a figure on each evaluation split is worth: model.pt is the epoch of best validation score
SPLITS = {
    "test": "the test split (cases that neither trained the model nor chose its checkpoint)",
    "val": "the validation split (the cases that chose model.pt, its best epoch: a flattering figure)",
    "train": "the training split (cases the model trained on)",
    "all": "every case (the training cases included)",
}
# a study "reproduces" when every paper figure on real data lies this close to ours (every paper
# figure of the grids is a fraction: Dice, IoU, recall, F-score); docs/report.md
REPRODUCED_WITHIN = 0.02
_REFERENCE_KEYS = ("name", "figures", "citation", "differs")


def split_sentence(splits: Mapping[str, str]) -> str:
    """Which split a table's rows are scored on: ``splits`` maps each experiment to its split; the
    most common one is named first, the others with their rows."""
    by_split: dict[str, list[str]] = defaultdict(list)
    for name, split in sorted(splits.items()):
        by_split[split].append(name)
    ordered = sorted(by_split, key=lambda s: -len(by_split[s]))
    parts = [f"Scored on {SPLITS.get(ordered[0], f'the {ordered[0]} split')}"]
    parts += [f"{', '.join(by_split[s])} on {SPLITS.get(s, f'the {s} split')}" for s in ordered[1:]]
    return "; ".join(parts) + "."


@dataclass(frozen=True)
class Reference:
    """A labelled reference row: figures from a source other than the paper (a second human
    observer, a challenge winner), its citation, and what differs from this study's scoring."""

    name: str
    figures: dict[str, float]
    citation: str
    differs: str


def load_references(spec: Mapping[str, Any], where: str | Path) -> list[Reference]:
    """The ``references`` of a grid; a row without a name, citation, what differs, or figures (a
    mapping of metric to number) is refused in one line naming ``where`` and the row."""
    raw = spec.get("references") or []
    if not isinstance(raw, list):
        raise InputError(f"{where}: references must be a list of rows ({', '.join(_REFERENCE_KEYS)})")
    out = []
    for i, entry in enumerate(raw, 1):
        if not isinstance(entry, Mapping):
            raise InputError(f"{where}: reference {i} must be a mapping ({', '.join(_REFERENCE_KEYS)})")
        label = f"reference '{entry['name']}'" if entry.get("name") else f"reference {i}"
        unknown = sorted(set(entry) - set(_REFERENCE_KEYS))
        if unknown:
            raise InputError(
                f"{where}: {label}: unknown key '{unknown[0]}' (keys: {', '.join(_REFERENCE_KEYS)})"
            )
        for key in ("name", "citation", "differs"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise InputError(
                    f"{where}: {label} has no {key}: a reference row names its source (citation) "
                    "and what differs from this study's scoring (differs)"
                )
        figures = entry.get("figures")
        if not isinstance(figures, Mapping) or not figures:
            raise InputError(f"{where}: {label} has no figures (a mapping of metric to number)")
        for metric, value in figures.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{where}: {label}: figure '{metric}' is {value!r}, not a number")
        out.append(
            Reference(
                entry["name"],
                {str(k): float(v) for k, v in figures.items()},
                entry["citation"],
                entry["differs"],
            )
        )
    return out


@dataclass(frozen=True)
class Cell:
    """One metric of one experiment: ours over seeds and the paper's figure."""

    values: tuple[float, ...] = ()
    paper: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.values) if self.values else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def difference(self) -> float | None:
        """Ours minus the paper's, where both exist."""
        return None if self.mean is None or self.paper is None else self.mean - self.paper

    def ours(self) -> str:
        if self.mean is None:
            return "-"
        spread = "" if self.sd is None else f" ± {self.sd:.4f}"
        return f"{self.mean:.4f}{spread} (n={self.n})"


@dataclass(frozen=True)
class Row:
    """One experiment: its cells by metric, the dataset it was scored on and its MLflow runs."""

    name: str
    cells: dict[str, Cell]
    dataset: str = "?"
    synthetic: bool = False
    split: str = "val"
    runs: tuple[str, ...] = ()
    note: str = ""


@dataclass
class PaperTable:
    """A study's paper-shaped table (see the module's docstring)."""

    study: str
    profile: str
    metrics: list[str]
    rows: list[Row]
    references: list[Reference] = field(default_factory=list)
    header: dict[str, str] = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        return any(r.synthetic for r in self.rows)

    def paper_metrics(self) -> list[str]:
        """The metrics with a paper figure in some row: they get a paper and a difference column."""
        return [m for m in self.metrics if any(r.cells.get(m, Cell()).paper is not None for r in self.rows)]

    def columns(self) -> list[str]:
        with_paper = set(self.paper_metrics())
        cols = ["experiment"]
        for m in self.metrics:
            cols += [m, f"{m} paper", f"{m} ours - paper"] if m in with_paper else [m]
        if self._mixed_datasets():
            cols.append("dataset")
        return [*cols, "runs"]

    def body(self) -> list[list[str]]:
        """The rows as text, experiments then references, in the order of :meth:`columns`."""
        with_paper, mixed = set(self.paper_metrics()), self._mixed_datasets()
        out = []
        for row in self.rows:
            line = [row.name]
            for m in self.metrics:
                cell = row.cells.get(m, Cell())
                line.append(cell.ours())
                if m in with_paper:
                    diff = cell.difference
                    line += [
                        "-" if cell.paper is None else f"{cell.paper:g}",
                        "-" if diff is None else f"{diff:+.4f}",
                    ]
            out.append(line + ([row.dataset] if mixed else []) + [" ".join(row.runs) or "-"])
        for ref in self.references:
            line = [f"reference: {ref.name}"]
            for m in self.metrics:
                line.append(f"{ref.figures[m]:g}" if m in ref.figures else "-")
                if m in with_paper:
                    line += ["-", "-"]
            out.append(line + (["-"] if mixed else []) + ["-"])
        return out

    def _mixed_datasets(self) -> bool:
        return len({r.dataset for r in self.rows}) > 1

    def verdict(self) -> str:
        """One line: synthetic only, or how ours compares with every paper figure on real data."""
        if self.rows and all(r.synthetic for r in self.rows):
            return "synthetic only: checks the pipeline, reproduces nothing"
        compared = [
            (abs(c.difference), c.difference, r.name, m)
            for r in self.rows
            if not r.synthetic
            for m, c in r.cells.items()
            if c.difference is not None
        ]
        if not compared:
            return "real data, no paper figure to compare with"
        off = [c for c in compared if c[0] > REPRODUCED_WITHIN]
        if not off:
            return f"reproduced: all {len(compared)} paper figures on real data within ±{REPRODUCED_WITHIN} of ours"
        _, diff, name, metric = max(off)
        return (
            f"not reproduced: {len(off)} of {len(compared)} paper figures on real data further than "
            f"±{REPRODUCED_WITHIN} from ours (largest: {name} {metric} {diff:+.4f})"
        )


def _distinct(values: Sequence[str]) -> str:
    return ", ".join(v for v, _ in Counter(values).most_common()) or "?"


def _header(profile: str, variants: Mapping[str, Sequence[Any]], rows: Sequence[Row]) -> dict[str, str]:
    runs = [r for rs in variants.values() for r in rs]
    tags = [r.data.tags for r in runs]
    commits = [
        t.get("git.commit", "unknown")[:8] + (" (dirty)" if t.get("git.dirty") == "true" else "")
        for t in tags
    ]
    starts = [r.info.start_time for r in runs if r.info.start_time]
    days = sorted({datetime.fromtimestamp(s / 1000, timezone.utc).strftime("%Y-%m-%d") for s in starts})
    return {
        "dataset": _distinct([r.dataset for r in rows]),
        "split": split_sentence({r.name: r.split for r in rows}),
        "commit": _distinct(commits),
        "date": (days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}") if days else "?",
        "hardware": _distinct([t.get("device", "?") for t in tags]),
        "profile": profile,
    }


def paper_table(study: str, profile: str, variants: Mapping[str, Sequence[Any]]) -> PaperTable:
    """The table of one study's reproduction runs (``variants``: experiment -> its MLflow runs, one
    per seed), from what the grid recorded with them: ``reproduce.order`` (the entry's place in the
    grid), ``reproduce.metrics``, ``paper.<metric>``, ``reproduce.references`` (JSON)."""

    def order(name: str) -> tuple[bool, int, str]:
        return name != "baseline", int(variants[name][0].data.tags.get("reproduce.order", 10**6)), name

    names = sorted(variants, key=order)
    recorded = next(
        (
            r.data.tags["reproduce.references"]
            for n in names
            for r in variants[n]
            if "reproduce.references" in r.data.tags
        ),
        "[]",
    )
    references = load_references({"references": json.loads(recorded)}, f"MLflow experiment '{study}'")
    metrics: list[str] = []
    for name in names:
        tags = variants[name][0].data.tags
        listed = [m for m in tags.get("reproduce.metrics", "dice").split(",") if m]
        metrics += listed + sorted(k[len("paper.") :] for k in tags if k.startswith("paper."))
    metrics = list(
        dict.fromkeys(metrics + [m for ref in references for m in ref.figures])
    )  # first place kept
    rows = []
    for name in names:
        runs = variants[name]
        tags = runs[0].data.tags
        split = tags.get("reproduce.split", "val")
        cells = {}
        for m in metrics:
            key = f"eval_{split}_{m}"
            paper = tags.get(f"paper.{m}")
            cells[m] = Cell(
                tuple(r.data.metrics[key] for r in runs if key in r.data.metrics),
                None if paper is None else float(paper),
            )
        kind = tags.get("dataset.kind", "?")
        rows.append(
            Row(
                name=name,
                cells=cells,
                dataset=f"{tags.get('dataset.id', '?')} ({kind}, {tags.get('dataset.hash', '?')[:8]})",
                synthetic=kind == "synthetic",
                split=split,
                runs=tuple(r.info.run_id[:8] for r in runs),
                note=tags.get("reproduce.note", ""),
            )
        )
    # a metric no row scored and nothing quotes is another label set's (e.g. BraTS 2015's classes)
    quoted = {m for ref in references for m in ref.figures}
    metrics = [
        m for m in metrics if m in quoted or any(r.cells[m].n or r.cells[m].paper is not None for r in rows)
    ]
    return PaperTable(study, profile, metrics, rows, references, _header(profile, variants, rows))
