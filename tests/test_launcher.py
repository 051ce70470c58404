"""The launcher's --help (every setting a user can give, read from the configs) and the old
``medseg_monai.bundle.<name>`` paths, which keep working one release with a deprecation warning."""

from __future__ import annotations

import re
import warnings

import pytest

from medseg_monai import bundle, config, runtime
from medseg_monai.bundle import main, settings
from medseg_monai.config import command_line, config_files, studies
from medseg_monai.data import inputs
from medseg_monai.errors import InputError

# the overrides the README and the docs tell users about: --help must list each of them
DOCUMENTED = (
    "ckpt_path", "input_path", "fold", "n_folds", "fold_pool", "train_split", "split", "dataset",
    "data_root", "seed", "resume", "overwrite", "fast", "output_dir", "max_epochs", "register",
)  # fmt: skip


def _listed(text: str) -> dict[str, str]:
    """``--key`` -> the rest of its line, for the settings section of a help text."""
    section = text.split("settings of ", 1)[1]
    return {m[1]: m[2] for m in re.finditer(r"^  --(\S+)\s+(.*)$", section, re.MULTILINE)}


def test_help_lists_every_setting_every_study_takes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = _listed(out)
    assert set(DOCUMENTED) <= set(listed), sorted(set(DOCUMENTED) - set(listed))
    assert list(listed) == list(settings())  # what the configs give, nothing else
    assert listed["fold"] == "a whole number from 0 (one fold of n_folds)"  # what the check takes
    assert listed["ckpt_path"].endswith("(evaluate, inference only)")
    assert listed["input_path"].endswith("(inference only)")
    for option in ("--mode", "--experiment", "--profile", "--dry_run"):  # the launcher's own
        assert option in out.split("settings of ")[0]


def test_a_study_help_lists_its_own_settings_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["xray", "--mode", "evaluate", "--help"]) == 0
    listed = _listed(capsys.readouterr().out)
    assert listed["lr_patience"] == "default 5"  # xray's train.yaml
    assert listed["image_size"] == "a positive whole number"  # what the check takes
    assert listed["split"] == "one of train, val, test, all"
    assert "input_path" not in listed  # inference's, not evaluate's


def test_help_of_an_unknown_study_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nostudy", "--help"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"error: unknown study 'nostudy' (studies: {', '.join(studies())})"]


# a value for the settings whose default is a reference ('@batch_size'), which a count may not be
# on the command line
EXAMPLES = {"val_batch_size": 2}


@pytest.mark.parametrize("study", studies())
def test_every_listed_setting_is_accepted(study: str) -> None:
    """Each setting --help lists, given its own default (or an example where that is a reference),
    passes the launcher's command-line check in each mode that takes it (an unknown one would be
    refused: 'unknown setting')."""
    for mode in ("train", "evaluate", "inference"):
        own = bundle._study_settings(study, mode)
        given = {key: EXAMPLES.get(key, own[key]) for key, modes in settings(study).items() if mode in modes}
        assert given, mode
        runtime.check_command_line(command_line(config_files(study, mode), **given)[2:])
    with pytest.raises(InputError, match="unknown setting 'max_epoch'.*did you mean 'max_epochs'"):
        runtime.check_command_line(command_line(config_files(study), max_epoch=2)[2:])


def test_old_paths_warn_and_give_the_moved_object() -> None:
    moved = {
        **{name: config for name in config.__all__},
        **{name: runtime for name in runtime.__all__},
        **{name: inputs for name in ("channel_cases", "image_files", "require_file")},
    }
    for name, module in moved.items():
        with pytest.warns(DeprecationWarning, match=rf"use {module.__name__}\.{name}$"):
            assert getattr(bundle, name) is getattr(module, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the launcher's own names do not warn
        assert bundle.main is main
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        bundle.nothing  # noqa: B018
