"""Every bundle, one suite: each config layer builds its engine, metadata matches the network, the
quick profile trains and evaluate writes the metrics.json contract, bad input ends in one line.

Parametrised over ``bundles/*`` (the studies the launcher finds), so a new bundle is tested by
being added. Study-specific checks (losses, networks, real data, learning curves) live in
``test_<study>.py``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from bundle_utils import ROOT, error_lines, parse, run_bundle
from medseg_monai.bundle import main
from medseg_monai.config import at_repo_root, command_line, config_files, meta_files, studies
from medseg_monai.data import get_dataset, load_splits
from medseg_monai.errors import InputError
from medseg_monai.reproduce import plan

STUDIES = studies()
# a config that builds with one training and one validation case is enough to build its engines
SMALL = {"train_datalist": "$@datalist['train'][:1]", "val_datalist": "$@datalist['val'][:1]"}


def _layers(study: str) -> list[tuple[str, str | None, str | None, dict[str, Any]]]:
    """(mode, experiment, profile, overrides) of every layer a user or the grid can run."""
    configs = ROOT / "bundles" / study / "configs"
    layers: list[tuple[str, str | None, str | None, dict[str, Any]]] = [
        ("train", None, None, {}),
        ("train", None, "quick", {}),
        ("evaluate", None, "quick", {}),
        ("inference", None, "quick", {}),
        ("multi_gpu_train", None, "quick", {}),
    ]
    layers += [("train", p.stem, "quick", {}) for p in sorted((configs / "experiments").glob("*.yaml"))]
    # a grid entry's own settings (a fine-tuning entry's start checkpoint exists only once its
    # parent has run: test_wmh checks that override)
    grid = [
        (j, {k: v for k, v in j.overrides.items() if k != "pretrained_ckpt"})
        for j in plan("quick", studies=[study])
    ]
    layers += [("train", j.configs[1].split("configs/")[1], "quick", own) for j, own in grid if own]
    return layers


LAYERS = [(s, *layer) for s in STUDIES for layer in _layers(s)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained quick-profile state dict per study, for building the evaluate/inference engines."""
    out = {}
    for study in STUDIES:
        net = parse(config_files(study, profile="quick"), {}).get_parsed_content("network_def")
        out[study] = tmp_path_factory.mktemp(study) / "model.pt"
        torch.save(net.state_dict(), out[study])
    return out


def _first_input(study: str) -> str:
    """One case of the study's synthetic dataset as its inference reads it: the file, or the files of
    a multi-channel case, comma-separated."""
    parser = parse(config_files(study, profile="quick"), {})
    case = load_splits(parser.get_parsed_content("dataset"))["val"][0]
    images = case["image"] if isinstance(case["image"], list) else [case["image"]]
    if "channel_cases" in str(parser["infer_datalist"]):  # one file per channel
        return ",".join(images)
    suffixes = tuple(parser.get_parsed_content("infer_suffixes"))
    assert images[0].endswith(suffixes), (images[0], suffixes)
    return images[0]


@pytest.mark.parametrize(
    ("study", "mode", "experiment", "profile", "overrides"),
    LAYERS,
    ids=[
        f"{s}-{m}-{e or 'default'}-{p or 'paper'}-{'-'.join(map(str, o.values()))}"
        for s, m, e, p, o in LAYERS
    ],
)
def test_every_layer_builds_its_engine(
    study: str,
    mode: str,
    experiment: str | None,
    profile: str | None,
    overrides: dict[str, Any],
    checkpoints: dict[str, Path],
    tmp_path: Path,
) -> None:
    files = config_files(study, mode, experiment, profile)
    settings = {**SMALL, **overrides, "output_dir": str(tmp_path)}
    if mode in ("evaluate", "inference"):
        settings["ckpt_path"] = str(checkpoints[study])
    if mode == "inference":
        settings["input_path"] = _first_input(study)
    parser = parse(files, settings)
    assert get_dataset(parser.get_parsed_content("dataset")).synthetic
    if mode in ("train", "multi_gpu_train"):
        trainer = parser.get_parsed_content("train#trainer")
        assert isinstance(trainer, SupervisedTrainer) and trainer.state.max_epochs == parser["max_epochs"]
        assert isinstance(parser.get_parsed_content("validate#evaluator"), SupervisedEvaluator)
        if experiment and not overrides:
            assert parser.get_parsed_content("experiment") == Path(experiment).stem
        for key, value in overrides.items():  # a sweep entry's settings reach the run
            assert parser.get_parsed_content(key) == value
        if mode == "multi_gpu_train":
            assert parser["finalize"]  # the DDP layer leaves the process group
    elif mode == "evaluate":
        evaluator = parser.get_parsed_content("validate#evaluator")
        assert isinstance(evaluator, SupervisedEvaluator)
        assert parser.get_parsed_content("validate#metrics_file") == str(tmp_path / "metrics_val.json")
    else:
        assert isinstance(parser.get_parsed_content("infer#evaluator"), SupervisedEvaluator)
        assert len(parser.get_parsed_content("infer#datalist")) == 1


EXPERIMENTS = [
    (s, e)
    for s in STUDIES
    for e in [
        None,
        *sorted(p.stem for p in (ROOT / "bundles" / s / "configs" / "experiments").glob("*.yaml")),
    ]
]


@pytest.mark.parametrize(
    ("study", "experiment"), EXPERIMENTS, ids=[f"{s}-{e or 'default'}" for s, e in EXPERIMENTS]
)
def test_metadata_describes_every_experiments_network(study: str, experiment: str | None) -> None:
    # MONAI's own check, with the metadata the launcher passes (metadata.json + <experiment>.meta.json)
    from monai.bundle import verify_net_in_out

    files = config_files(study, experiment=experiment)
    metas = meta_files(files)
    with at_repo_root():
        verify_net_in_out(net_id="network_def", meta_file=metas, config_file=files, device="cpu", p=1, n=1)
    meta = ConfigParser.load_config_files(metas)  # merged as MONAI merges them
    parser = parse(files)
    net = parser.get_parsed_content("network_def")
    image, pred = (
        meta["network_data_format"]["inputs"]["image"],
        meta["network_data_format"]["outputs"]["pred"],
    )
    first = next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    assert first.in_channels == image["num_channels"] == len(image["channel_def"])
    assert pred["num_channels"] == len(pred["channel_def"])


@pytest.mark.parametrize("study", STUDIES)
def test_shared_layers_are_the_common_files(study: str) -> None:
    # evaluate, inference, multi-GPU and logging are the shared wiring, never a per-bundle copy
    configs = ROOT / "bundles" / study / "configs"
    common = ROOT / "bundles" / "common" / "configs"
    for name in ("evaluate.yaml", "inference.yaml", "multi_gpu_train.yaml", "logging.conf"):
        assert (configs / name).resolve() == (common / name).resolve(), name
    train = yaml.safe_load((configs / "train.yaml").read_text())
    for section in ("device", "amp", "network", "train", "validate", "initialize", "run"):
        assert train[section] == f"%bundles/common/configs/train.yaml#{section}", section


def test_launcher_layers_files_in_order() -> None:
    files = config_files("xray", "evaluate", "noise_val_only", "quick")
    assert files == [
        "bundles/xray/configs/train.yaml",
        "bundles/xray/configs/experiments/noise_val_only.yaml",
        "bundles/xray/configs/quick.yaml",
        "bundles/xray/configs/evaluate.yaml",
    ]
    assert config_files("wmh", profile="paper") == ["bundles/wmh/configs/train.yaml"]
    cmd = command_line(files, seed=3, split="all")
    assert cmd[cmd.index("--meta_file") + 1] == "bundles/xray/configs/metadata.json"
    assert cmd[cmd.index("--logging_file") + 1] == "bundles/xray/configs/logging.conf"
    assert cmd[-4:] == ["--seed", "3", "--split", "all"]
    experiments = ", ".join(
        sorted(f.stem for f in (ROOT / "bundles/xray/configs/experiments").glob("*.yaml"))
    )
    with pytest.raises(
        InputError, match=rf"no config .*experiments/nope.yaml \(experiments of xray: {experiments}\)$"
    ):
        config_files("xray", experiment="nope")
    with pytest.raises(InputError, match=r"no config .*xray/configs/fast.yaml \(profiles: paper, quick\)$"):
        config_files("xray", profile="fast")
    with pytest.raises(InputError, match="unknown mode 'test'"):
        config_files("xray", "test")


def test_launcher_cli_dry_run_and_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["xray", "--profile", "quick", "--dry_run", "--max_epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "monai.bundle run --config_file" in out and "bundles/xray/configs/quick.yaml" in out
    assert out.rstrip().endswith("--max_epochs 2")
    assert main(["nostudy"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown study 'nostudy' (studies: brats, ")


# --- one fast end-to-end path per bundle ------------------------------------------------------------


@pytest.mark.parametrize("study", STUDIES)
def test_quick_train_then_evaluate_writes_the_contract(study: str, tmp_path: Path) -> None:
    out, store = tmp_path / "run", tmp_path / "mlflow"
    trained = run_bundle(study, store, output_dir=out, max_epochs=2)
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["dataset"]["kind"] == "synthetic" and record["profile"] == "quick"
    assert record["command"][1] == "run" and "--config_file" in record["command"]
    assert record["cpu_threads"] == int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    assert record["cpu"].endswith(f"{os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}")
    config = json.loads((out / "config.json").read_text())
    assert config["max_epochs"] == 2 and isinstance(config["train"], dict)  # macros expanded
    evaluated = run_bundle(study, store, mode="evaluate", output_dir=out, split="val")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    parser = parse(config_files(study, profile="quick"), {})
    # the bundle's class set where it chooses one (LV: the LV's classes), else the dataset's default
    classes = (
        parser.get_parsed_content("class_names")
        if "class_names" in parser
        else get_dataset(parser.get_parsed_content("dataset")).class_names()
    )
    names = [c for c in classes if c != "background"]
    assert {"dice", *(f"dice_{c}" for c in names)} <= set(metrics["mean"])
    val = json.loads((out / "eval_val_datalist.json").read_text())["validation"]
    assert set(metrics["cases"]) == {c["case_id"] for c in val}
    assert all(0 <= metrics["mean"][f"dice_{c}"] <= 1 for c in names)


@pytest.mark.parametrize(  # the X-ray bundle in the default run, every bundle in the slow one
    "study", [s if s == "xray" else pytest.param(s, marks=pytest.mark.slow) for s in STUDIES]
)
@pytest.mark.parametrize("fault", ["dataset", "checkpoint", "train_split", "fold"])
def test_bad_setting_is_one_error_line(study: str, fault: str, tmp_path: Path) -> None:
    if fault == "fold":
        result = run_bundle(study, tmp_path / "mlflow", fold=5, output_dir=tmp_path)
        expected = "fold must be a whole number from 0 to 4 (n_folds 5), got 5"
    elif fault == "train_split":
        result = run_bundle(study, tmp_path / "mlflow", train_split="val", output_dir=tmp_path)
        expected = "train_split must be train or all, got 'val'"
    elif fault == "dataset":
        result = run_bundle(study, tmp_path / "mlflow", dataset="no-such-dataset", output_dir=tmp_path)
        expected = "unknown dataset 'no-such-dataset'; known:"
    else:
        missing = tmp_path / "absent.pt"
        result = run_bundle(
            study, tmp_path / "mlflow", mode="evaluate", ckpt_path=missing, output_dir=tmp_path
        )
        expected = f"checkpoint not found: {missing}"
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("study", STUDIES)
def test_fold_selects_the_cases_and_names_the_run(study: str) -> None:
    every = {"train_size": None} if study == "xray" else {}  # X-ray's quick profile trains on 20
    plain = parse(config_files(study, profile="quick"), every)
    fold = parse(config_files(study, profile="quick"), {"fold": 1, "n_folds": 3, **every})
    assert fold.get_parsed_content("output_dir").endswith(f"seed{fold['seed']}_fold1")
    assert plain.get_parsed_content("output_dir").endswith(f"seed{plain['seed']}")
    train, val = (fold.get_parsed_content(k) for k in ("train_datalist", "val_datalist"))
    pool = plain.get_parsed_content("datalist")
    assert {c["case_id"] for c in train + val} == {c["case_id"] for c in pool["train"] + pool["val"]}
    assert not {c["group"] for c in train} & {c["group"] for c in val} and val != pool["val"]
    tracker = fold.get_parsed_content("train#handlers")[0]
    assert tracker.run_name.endswith("fold1 (quick)")


# --- what the studies' configs repeat ----------------------------------------------------------------
# A line is repeated when it lies in a run of RUN or more consecutive lines that also occur, in the
# same order, in the other file; lines are compared as written (comments included), blank lines
# skipped. bundles/README.md quotes these figures: `python tests/test_bundles.py` prints them.

RUN = 3
MAX_SHARED_METHOD_LINES = 20  # between two studies' train.yaml, beyond the contract block
METHOD_MARKER = "# --- the method ---"  # ends a train.yaml's contract block


def config_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def method_lines(train_yaml: Path) -> list[str]:
    """A study's train.yaml after its contract block (the include block, imports and the contract
    keys, up to the method marker)."""
    lines = config_lines(train_yaml.read_text())
    assert METHOD_MARKER in lines, f"{train_yaml}: no '{METHOD_MARKER}' line after the contract keys"
    return lines[lines.index(METHOD_MARKER) + 1 :]


def repeated(a: list[str], b: list[str], run: int = RUN) -> set[int]:
    """The indices of the lines of ``a`` that lie in a run of ``run`` or more consecutive lines
    that ``b`` also holds consecutively."""
    runs_of_b = {tuple(b[i : i + run]) for i in range(len(b) - run + 1)}
    return {
        k for i in range(len(a) - run + 1) if tuple(a[i : i + run]) in runs_of_b for k in range(i, i + run)
    }


def shared_lines(a: list[str], b: list[str]) -> int:
    """Lines two files repeat from each other (the larger of the two sides' counts)."""
    return max(len(repeated(a, b)), len(repeated(b, a)))


def study_yaml_files(study: str) -> list[Path]:
    """A study's own YAML (train, quick, bench, reproduce, search, experiments), not the links to
    the shared layers."""
    configs = ROOT / "bundles" / study / "configs"
    return [p for p in sorted(configs.rglob("*.yaml")) if not p.is_symlink()]


def test_repeated_counts_runs_of_three_or_more() -> None:
    a = ["x: 1", "a: 1", "b: 2", "c: 3", "d: 4", "y: 1", "a: 1", "b: 2"]
    b = ["a: 1", "b: 2", "c: 3", "z: 0", "a: 1", "b: 2", "q: 0", "d: 4"]
    assert repeated(a, b) == {1, 2, 3}  # a-b-c runs on; the pair a-b and the single d do not count
    assert repeated(b, a) == {0, 1, 2}
    assert shared_lines(a, b) == 3 and shared_lines(a, a) == len(a)
    assert config_lines("a: 1\n\n  # note  \nb: 2   \n") == ["a: 1", "  # note", "b: 2"]


def test_studies_train_yaml_share_at_most_20_method_lines() -> None:
    # what two or more bundles share lives in bundles/common/configs (the wiring, parts.yaml); a
    # study's train.yaml is its contract keys and its method
    method = {s: method_lines(ROOT / "bundles" / s / "configs" / "train.yaml") for s in STUDIES}
    shared = {(s, t): shared_lines(method[s], method[t]) for s, t in itertools.combinations(STUDIES, 2)}
    assert len(shared) == len(STUDIES) * (len(STUDIES) - 1) // 2 >= 10
    over = {pair: n for pair, n in shared.items() if n > MAX_SHARED_METHOD_LINES}
    assert not over, f"train.yaml lines repeated between studies beyond the contract block: {over}"


def repetition_figures() -> dict[str, Any]:
    """The figures bundles/README.md quotes."""
    method = {s: method_lines(ROOT / "bundles" / s / "configs" / "train.yaml") for s in STUDIES}
    pairs = {f"{s}-{t}": shared_lines(method[s], method[t]) for s, t in itertools.combinations(STUDIES, 2)}
    files = {s: {p: config_lines(p.read_text()) for p in study_yaml_files(s)} for s in STUDIES}
    parts = ["train.yaml contract blocks", "train.yaml methods", "experiments", "the rest"]
    total, by_part = 0, dict.fromkeys(parts, 0)  # the rest: quick, bench, reproduce, search
    for s in STUDIES:
        for path, lines in files[s].items():  # lines repeated from some file of another study
            others = (other for t in STUDIES if t != s for other in files[t].values())
            hit = set().union(*(repeated(lines, other) for other in others))
            total += len(lines)
            if path.name == "train.yaml":
                start = len(lines) - len(method[s])
                by_part["train.yaml contract blocks"] += sum(i < start for i in hit)
                by_part["train.yaml methods"] += sum(i >= start for i in hit)
            else:
                by_part["experiments" if path.parent.name == "experiments" else "the rest"] += len(hit)
    repeated_lines = sum(by_part.values())
    return {
        "method lines of train.yaml": {s: len(lines) for s, lines in method.items()},
        "train.yaml method lines repeated, by pair": pairs,
        "study YAML lines": total,
        "repeated from another study's file": f"{repeated_lines} ({repeated_lines / total:.0%})",
        "of which": by_part,
    }


if __name__ == "__main__":
    print(json.dumps(repetition_figures(), indent=1))
