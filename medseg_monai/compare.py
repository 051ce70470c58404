"""``python -m medseg_monai.compare <run A> <run B>``: is A better than B on the same cases?

    python -m medseg_monai.compare <run A> <run B> [--metric dice_heart] [--split test]
        [--direction higher|lower] [--output out.json]

A run is a run folder (one holding the ``metrics.json`` that evaluate writes: ``{"mean": {...},
"cases": {case id: {metric: value}}}``), a folder of such folders (one per seed: the seeds are
averaged per case), or an MLflow run id or run name in the tracking store (its ``metrics.json``
artifact). The paired statistics of :mod:`medseg_monai.stats` (mean per-case difference A - B with
its 95 % bootstrap interval, Wilcoxon signed-rank p, verdict) are printed as a short table and, with
``--output``, written as JSON. The metric defaults to the study's headline (the first of its
``headline_metrics``, e.g. ``dice``). Refused in one ``error:`` line, exit status 2: a run that
cannot be found, a metric a run has no per-case value of, runs scored on different cases or splits.
What each figure means: ``docs/statistics.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg_monai.errors import InputError, redact
from medseg_monai.io import write_json
from medseg_monai.paths import project_root
from medseg_monai.stats import NO_DIFFERENCE, Paired, holm_adjust, paired
from medseg_monai.tracking import check_tracking_uri, open_client

__all__ = [
    "RunScores",
    "compare",
    "headline_metric",
    "load_run",
    "main",
    "mlflow_cases",
    "sentence",
    "table",
    "versus_baseline",
]

METRICS_FILE = "metrics.json"
_EVAL_RECORD = re.compile(r"eval_(\w+)_run\.json")
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_SHOWN = 4  # case or run ids named in an error line


@dataclass
class RunScores:
    """A run's per-case metrics as loaded: ``label`` (what the user passed), ``source`` (``folder``
    or ``mlflow``), ``runs`` (the folders or run ids read, one per seed), ``study``, ``split`` (None
    where no record says), ``seeds`` (``{seed label: {case id: {metric: value}}}``) and the
    ``means`` of the first run's ``metrics.json`` (pooled figures live only there)."""

    label: str
    source: str
    runs: list[str]
    study: str | None
    split: str | None
    seeds: dict[str, dict[str, dict[str, Any]]]
    means: dict[str, Any]

    def metric(self, name: str) -> dict[str, dict[str, float]]:
        """``{seed: {case: value}}`` of metric ``name`` (NaN where a case has none); refused when no
        case has it."""
        if not any(name in values for cases in self.seeds.values() for values in cases.values()):
            some = sorted({k for cases in self.seeds.values() for v in cases.values() for k in v})
            pooled = (
                " (only a pooled figure in 'mean': no per-case values to pair)" if name in self.means else ""
            )
            shown = ", ".join(some[:12]) + (", ..." if len(some) > 12 else "")
            raise InputError(f"{self.label}: no per-case '{name}'{pooled}; its cases have: {shown}")
        return {
            seed: {case: _number(values.get(name)) for case, values in cases.items()}
            for seed, cases in self.seeds.items()
        }

    def describe(self) -> dict[str, Any]:
        """Where the scores came from, for the JSON output."""
        return {
            "ref": self.label,
            "source": self.source,
            "runs": self.runs,
            "study": self.study,
            "split": self.split,
        }


def _number(value: Any) -> float:
    if value is None:  # JSON null: no value, as NaN
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"a per-case value {value!r} is not a number")
    return float(value)


# ----------------------------------------------------------------------------- reading runs


def _metrics_doc(text: str, where: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The ``cases`` and ``mean`` of a ``metrics.json``'s text, refused unless evaluate's shape."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not JSON ({e})") from None
    cases = doc.get("cases") if isinstance(doc, dict) else None
    if not isinstance(cases, dict) or not all(isinstance(v, dict) for v in cases.values()):
        raise InputError(
            f"{where}: no per-case metrics (evaluate writes {{'mean': ..., 'cases': {{id: ...}}}})"
        )
    return cases, doc.get("mean") or {}


def _split_of(case_ids: set[str], records: Mapping[str, Sequence[str]]) -> str | None:
    """The split whose evaluation record (``eval_<split>_run.json``: the cases it scored) lists
    exactly ``case_ids``: ``metrics.json`` holds the last evaluation only, of any split."""
    found = [split for split, ids in sorted(records.items()) if set(ids) == case_ids]
    return found[0] if found else None


def _record_cases(text: str, split: str) -> list[str]:
    """The case ids an evaluation record (``eval_<split>_run.json``) lists for ``split``."""
    try:
        return list(json.loads(text)["dataset"]["cases"][split])
    except (json.JSONDecodeError, KeyError, TypeError):
        return []


def _study_of(folder: Path) -> str | None:
    """The study a run folder's record names (``run.json``, else an evaluation record)."""
    for record in [folder / "run.json", *sorted(folder.glob("eval_*_run.json"))]:
        try:
            return str(json.loads(record.read_text())["study"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
    return None


def _from_folder(path: Path, label: str) -> RunScores:
    """A run folder, or a folder whose sub-folders are run folders (the seeds of one experiment)."""
    folders = [path] if (path / METRICS_FILE).is_file() else sorted(
        p for p in path.iterdir() if (p / METRICS_FILE).is_file()
    )  # fmt: skip
    if not folders:
        raise InputError(
            f"{label}: no {METRICS_FILE} in it or its sub-folders (evaluate the run first: "
            f"python -m medseg_monai.bundle <study> --mode evaluate --ckpt_path {label}/model.pt)"
        )
    seeds, splits, means = {}, set(), {}
    for folder in folders:
        cases, mean = _metrics_doc((folder / METRICS_FILE).read_text(), str(folder / METRICS_FILE))
        means = means or mean
        seeds[folder.name] = cases
        records = {
            m.group(1): _record_cases(p.read_text(), m.group(1))
            for p in folder.glob("eval_*_run.json")
            if (m := _EVAL_RECORD.fullmatch(p.name))
        }
        splits.add(_split_of(set(cases), records))
    if len(splits) > 1:
        raise InputError(f"{label}: its runs were scored on different splits ({sorted(map(str, splits))})")
    return RunScores(
        label, "folder", [str(f) for f in folders], _study_of(folders[0]), splits.pop(), seeds, means
    )


def _find_run(client: Any, ref: str, uri: str) -> Any:
    """The MLflow run whose id or name is ``ref``; refused when none or several match."""
    from mlflow.exceptions import MlflowException

    if _RUN_ID.fullmatch(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            pass
    if "'" in ref and '"' in ref:
        raise InputError(
            f"{ref!r}: a run name with both kinds of quotes cannot be looked up; pass its run id"
        )
    quote = '"' if "'" in ref else "'"
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = (
        client.search_runs(
            experiments, filter_string=f"attributes.run_name = {quote}{ref}{quote}", max_results=50
        )
        if experiments
        else []
    )
    if not found:
        raise InputError(f"{ref!r} is neither a run folder nor an MLflow run id or run name in {redact(uri)}")
    if len(found) > 1:
        ids = _few([r.info.run_id for r in found])
        raise InputError(f"{ref!r} names {len(found)} MLflow runs ({ids}): pass one run id")
    return found[0]


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar on stderr for every download: it would bury the one-line output."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def mlflow_cases(
    client: Any, run: Any, find_split: bool = True
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], str | None]:
    """The ``cases`` and ``mean`` of an MLflow run's ``metrics.json`` artifact and the split they
    were scored on: from the run's ``eval_<split>_run.json`` artifacts (with ``find_split``), else
    its ``reproduce.split`` tag. Refused when the run has no such artifact. Files are read straight
    from the run's artifact location (a few ms each; through the run id MLflow looks the run up again
    for every file)."""
    from mlflow.artifacts import download_artifacts, list_artifacts
    from mlflow.exceptions import MlflowException

    base, uri = run.info.artifact_uri.rstrip("/"), client.tracking_uri
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
        try:
            local = download_artifacts(artifact_uri=f"{base}/{METRICS_FILE}", dst_path=tmp, tracking_uri=uri)
        except (MlflowException, OSError):
            raise InputError(
                f"MLflow run {run.info.run_id} has no {METRICS_FILE} artifact: evaluate it first "
                "(python -m medseg_monai.bundle <study> --mode evaluate --ckpt_path <run folder>/model.pt)"
            ) from None
        cases, mean = _metrics_doc(Path(local).read_text(), f"MLflow run {run.info.run_id}: {METRICS_FILE}")
        records = {}
        names = (
            [Path(f.path).name for f in list_artifacts(artifact_uri=base, tracking_uri=uri)]
            if find_split
            else []
        )
        for name in names:
            if m := _EVAL_RECORD.fullmatch(name):
                text = Path(download_artifacts(artifact_uri=f"{base}/{name}", dst_path=tmp, tracking_uri=uri))
                records[m.group(1)] = _record_cases(text.read_text(), m.group(1))
    return cases, mean, _split_of(set(cases), records) or run.data.tags.get("reproduce.split")


def load_run(ref: str, client: Any = None) -> RunScores:
    """The per-case metrics of ``ref``: a run folder (or a folder of seed folders), else an MLflow
    run id or name in the tracking store (``client``, default :func:`medseg_monai.tracking.open_client`
    after checking that a server answers). Refused in one line when nothing matches."""
    path = Path(ref).expanduser()
    if path.is_file() and path.name == METRICS_FILE:
        path = path.parent
    if path.is_dir():
        return _from_folder(path, ref)
    if "/" in ref or ref.startswith("."):
        raise InputError(f"{ref}: no such run folder")
    uri = check_tracking_uri()
    client = client if client is not None else open_client(uri)
    run = _find_run(client, ref, uri)
    cases, mean, split = mlflow_cases(client, run)
    study = client.get_experiment(run.info.experiment_id).name
    return RunScores(ref, "mlflow", [run.info.run_id], study, split, {run.info.run_id: cases}, mean)


def headline_metric(study: str | None) -> str | None:
    """The first of a study's ``headline_metrics`` (its bundle's ``train.yaml``: a list, or an
    expression that starts with the headline such as ``$['dice'] + [...]``); None if unknown."""
    import yaml

    if not study or not re.fullmatch(r"\w+", study):
        return None
    train = project_root() / "bundles" / study / "configs" / "train.yaml"
    try:
        value = yaml.safe_load(train.read_text()).get("headline_metrics")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if isinstance(value, list) and value:
        return str(value[0])
    m = re.match(r"\$\s*\[\s*['\"](\w+)['\"]", value) if isinstance(value, str) else None
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- comparing


def _few(ids: Sequence[str]) -> str:
    return ", ".join(sorted(ids)[:_SHOWN]) + (", ..." if len(ids) > _SHOWN else "")


def compare(
    a: RunScores,
    b: RunScores,
    metric: str | None = None,
    split: str | None = None,
    lower_better: bool | None = None,
) -> Paired:
    """The paired comparison A - B of ``metric`` (default: A's study headline, else B's); refused
    when the runs are on other splits than ``split`` or each other, or on different cases."""
    for side in (a, b):
        if split is not None and side.split is None:
            raise InputError(
                f"{side.label}: cannot tell which split its {METRICS_FILE} was scored on (no "
                f"eval_<split>_run.json lists its cases): leave out --split"
            )
        if split is not None and side.split != split:
            raise InputError(
                f"{side.label}: its {METRICS_FILE} is scored on the {side.split} split, not {split}: "
                f"evaluate it with --split {split}"
            )
    if a.split and b.split and a.split != b.split:
        raise InputError(f"{a.label} is scored on the {a.split} split, {b.label} on the {b.split} split")
    metric = metric or headline_metric(a.study) or headline_metric(b.study)
    if metric is None:
        raise InputError(f"no headline metric known for study {a.study or b.study or '?'}: pass --metric")
    scores_a, scores_b = a.metric(metric), b.metric(metric)
    cases_a = set(next(iter(scores_a.values())))
    cases_b = set(next(iter(scores_b.values())))
    if cases_a != cases_b:
        raise InputError(
            f"the runs were scored on different cases: {len(cases_a - cases_b)} only in {a.label} "
            f"({_few(list(cases_a - cases_b))}), {len(cases_b - cases_a)} only in {b.label} "
            f"({_few(list(cases_b - cases_a))}): compare runs evaluated on the same split of the same data"
        )
    return paired(scores_a, scores_b, metric, lower_better=lower_better)


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def sentence(result: Paired, a: str = "A", b: str = "B") -> str:
    """The verdict in words, with the direction that counts as better."""
    better = "lower" if result.lower_is_better else "higher"
    said = "" if result.verdict == NO_DIFFERENCE else f"{a} is {result.verdict} than {b}; "
    return f"{result.verdict} ({said}{better} {result.metric} is better; two-sided, alpha {result.alpha:g})"


def table(result: Paired, a: RunScores, b: RunScores) -> str:
    """The printed summary: each side's mean and spreads, the difference, the test, the verdict."""
    split = f"the {a.split or b.split} split" if (a.split or b.split) else "an unrecorded split"
    width = max(len(a.label), len(b.label), 5) + 4
    lines = [
        f"{result.metric}: {len(result.cases)} cases of {split}, A - B",
        f"{'':{width}}{'mean':>9}{'case sd':>9}{'seed sd':>9}{'seeds':>7}",
    ]
    for name, scores, side in (("A", a, result.a), ("B", b, result.b)):
        lines.append(
            f"{name + '  ' + scores.label:{width}}{_fmt(side.mean):>9}{_fmt(side.case_sd):>9}"
            f"{_fmt(side.seed_sd):>9}{side.seeds:>7}"
        )
    low, high = result.ci
    lines += [
        f"{'A - B':{width}}{_fmt(result.mean_difference, True):>9}   95 % CI [{_fmt(low, True)}, "
        f"{_fmt(high, True)}] (bootstrap over cases), median {_fmt(result.median_difference, True)}",
        f"Wilcoxon signed-rank p = {result.p_value:.4g} ({result.test}; {result.n_nonzero} non-zero differences)",
        f"verdict: {sentence(result)}",
    ]
    if result.note:
        lines.append(f"note: {result.note}")
    if result.left_out.get("nan"):
        lines.append(
            f"left out: {len(result.left_out['nan'])} case(s) without a value ({_few(result.left_out['nan'])})"
        )
    return "\n".join(lines)


def versus_baseline(
    client: Any, variants: Mapping[str, Sequence[Any]], study: str, baseline: str = "baseline"
) -> tuple[str | None, list[tuple[str, Paired | str]]]:
    """Every experiment of a study against ``baseline`` (``variants``: experiment -> its MLflow runs,
    one per seed) on the headline metric, Holm-corrected across the experiments: ``(metric, rows)``
    with each row a :class:`Paired` or why it could not be compared (another split or dataset, no
    per-case metrics). ``(None, [])`` when the study has no ``baseline`` or nothing else."""
    if baseline not in variants or len(variants) < 2:
        return None, []
    loaded: dict[str, tuple[dict[str, dict[str, Any]], str, str]] = {}
    reasons: dict[str, str] = {}
    for name, runs in variants.items():
        seeds = {}
        for run in runs:
            try:
                seeds[run.data.tags.get("seed", run.info.run_id)] = mlflow_cases(client, run, False)[0]
            except (InputError, OSError) as e:
                reasons[name] = str(e)
                break
        tags = runs[0].data.tags
        loaded[name] = (seeds, tags.get("reproduce.split", "val"), tags.get("dataset.id", "?"))
    if baseline in reasons:
        return None, [(baseline, reasons[baseline])]
    base_seeds, base_split, base_data = loaded[baseline]
    first_case = next(iter(next(iter(base_seeds.values())).values()), {})
    metric = headline_metric(study)
    if metric not in first_case:  # e.g. a study whose per-case keys differ from its log line's
        metric = next(iter(first_case), None)
    if metric is None:
        return None, [(baseline, "no per-case metrics")]
    base = RunScores(baseline, "mlflow", [], study, base_split, base_seeds, {}).metric(metric)
    rows: list[tuple[str, Paired | str]] = []
    for name in [n for n in variants if n != baseline]:  # the caller's order (the report's: the paper's)
        seeds, split, data = loaded[name]
        if name in reasons:
            rows.append((name, reasons[name]))
        elif split != base_split:
            rows.append((name, f"scored on the {split} split, the baseline on {base_split}"))
        elif data != base_data:
            rows.append((name, f"scored on {data}, the baseline on {base_data}"))
        else:
            try:
                scores = RunScores(name, "mlflow", [], study, split, seeds, {}).metric(metric)
                rows.append((name, paired(scores, base, metric)))
            except InputError as e:
                rows.append((name, str(e)))
    done = [r for _, r in rows if isinstance(r, Paired)]
    adjusted = iter(holm_adjust(done))
    return metric, [(n, next(adjusted) if isinstance(r, Paired) else r) for n, r in rows]


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(prog="medseg-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="run folder, folder of seed folders, MLflow run id or run name")
    parser.add_argument("run_b", help="the run A is compared with (the differences are A - B)")
    parser.add_argument("--metric", help="a per-case metric of metrics.json (default: the study's headline)")
    parser.add_argument("--split", help="refuse unless both runs are scored on this split")
    parser.add_argument(
        "--direction", choices=("higher", "lower"), help="which is better (default: from the metric's name)"
    )
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    try:
        a, b = load_run(args.run_a), load_run(args.run_b)
        lower = None if args.direction is None else args.direction == "lower"
        result = compare(a, b, args.metric, args.split, lower)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result, a, b))
    if args.output:
        doc = result.as_dict()
        doc["a"] = {**a.describe(), **doc["a"]}
        doc["b"] = {**b.describe(), **doc["b"]}
        doc["split"] = a.split or b.split
        doc["sentence"] = sentence(result)
        write_json(doc, args.output)
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
