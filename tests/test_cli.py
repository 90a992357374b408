"""The command line as a new user meets it (issue 14): fast help, version, flags anywhere, threads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipelines import common
from pipelines.cli import build_parser, chosen_command, main


def test_top_level_help_is_fast_and_imports_no_torch():
    code = (
        "import sys, time; t = time.perf_counter(); from pipelines.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'clinical-moe --help imported torch'\n"
        "print(time.perf_counter() - t, file=sys.stderr)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - start < 5  # interpreter start included; in-process < 1 s
    assert float(out.stderr.strip().splitlines()[-1]) < 1.0


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("clinical-moe ")


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "WARNING", "--threads", "2", "preprocess", "data.nope=1"],
        ["preprocess", "data.nope=1", "--log-level", "WARNING", "--threads", "2"],
    ],
)
def test_common_flags_before_or_after_the_command(argv):
    args = build_parser(argv).parse_args(argv)
    assert args.log_level == "WARNING" and args.threads == 2 and args.debug is False


def test_chosen_command_skips_option_values():
    assert chosen_command(["--log-level", "train", "evaluate"]) == "evaluate"
    assert chosen_command(["--help"]) is None


def test_resume_flags_are_the_same_on_preprocess_and_train():
    for cmd, default in (("preprocess", True), ("train", False)):
        base = [cmd, "--config", "x.yaml"]
        assert build_parser(base).parse_args(base).resume is default
        for flag, value in (("--resume", True), ("--no-resume", False)):
            assert build_parser(base).parse_args([*base, flag]).resume is value


def test_help_has_no_raw_rest(capsys):
    from pipelines.cli import PIPELINES

    for cmd in PIPELINES:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out and ":class:" not in out, cmd
        assert not any(line.rstrip().endswith("::") for line in out.splitlines()), cmd


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="data.nope"):
        main(["preprocess", "data.nope=1", "--debug"])


def test_threads_default_to_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert common.default_threads(None) == 1
    assert common.default_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert common.default_threads(None) == 2


def test_apply_threads_sets_torch_and_the_environment(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for key in common.THREAD_ENV:
        monkeypatch.delenv(key, raising=False)
    try:
        assert common.apply_threads(None) == 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_train_before_synth_suggests_synth_and_leaves_nothing(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = [
        "train",
        "--config",
        "configs/tiny/late.yaml",
        f"data.root={tmp_path / 'nowhere'}",
        f"data.cache_dir={cache}",
        f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "clinical-moe synth" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_configs_list_and_cp_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["configs", "list"]) == 0
    listed = capsys.readouterr().out
    assert "tiny/fusemoe.yaml" in listed and "data/synthetic.yaml" in listed
    assert main(["configs", "cp", "tiny/late", "mine.yaml"]) == 0
    from clinical_moe.config import load_config

    cfg = load_config("mine.yaml")  # its `include: ../data/synthetic.yaml` is the packaged one
    assert cfg.model.name == "late" and cfg.data.root == load_config("tiny/late").data.root
    assert main(["configs", "cp", "tiny/late", "mine.yaml"]) == 2  # no silent overwrite
    assert main(["configs", "cp", "nope", "x.yaml"]) == 2
    assert load_config("configs/tiny/late.yaml").model.name == "late"  # from notebooks/ too
