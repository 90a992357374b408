"""A bad config fails before any work: the message names the key and nothing is written."""

from __future__ import annotations

import pytest

from clinical_moe.config import ConfigError
from pipelines import cli
from pipelines import train as train_pipeline

from .conftest import CONFIGS


def _args(tmp_path, config, *extra):
    return [
        "--config",
        str(config),
        "--quiet",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.checkpoint_dir={tmp_path / 'ckpt'}",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
        *extra,
    ]


@pytest.mark.parametrize(
    "bad,message",
    [
        ("train:\n  learning_rate: 0.1\n", "unknown config key 'train.learning_rate'"),
        ("model:\n  head:\n    num_expert: 4\n", "model.head.num_expert"),
        ("train:\n  scheduler: linear\n", "train.scheduler"),
        ("train:\n  checkpoint_every: -1\n", "train.checkpoint_every"),
    ],
)
def test_bad_yaml_key_fails_first_and_writes_nothing(bad, message, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"include: {CONFIGS / 'tiny' / 'late.yaml'}\n{bad}")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        train_pipeline.main(_args(tmp_path, config))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no cache, run or store


def test_bad_override_through_the_cli(tmp_path, capsys):
    """A bad value is one line naming the key, exit code 2, no traceback, nothing written."""
    rc = cli.main(["train", *_args(tmp_path, CONFIGS / "tiny" / "late.yaml", "train.epochs=0")])
    err = capsys.readouterr().err
    assert rc == 2 and "train.epochs" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_cache_without_builder_says_to_preprocess(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "clinical_moe.data.cache", None)  # import fails
    with pytest.raises(RuntimeError, match="clinical-moe preprocess"):
        train_pipeline.main(_args(tmp_path, CONFIGS / "tiny" / "late.yaml"))


def test_absent_cache_is_built_with_the_config(tmp_path, monkeypatch, shared_uri):
    """``train`` calls ``build_cache(cfg)`` when ``data.cache_dir`` has no manifest."""
    import clinical_moe.data.cache as cache_module
    from clinical_moe.testing import write_toy_cache

    seen = []

    def fake_build_cache(cfg, **kwargs):
        seen.append(cfg.data.cache_dir)
        write_toy_cache(cfg.data.cache_dir, n_stays=60)
        return cfg.data.cache_dir

    monkeypatch.setattr(cache_module, "build_cache", fake_build_cache)
    args = _args(
        tmp_path,
        CONFIGS / "tiny" / "late.yaml",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "tracking.log_model=false",
        "train.num_threads=1",
        f"tracking.uri={shared_uri}",
        "tracking.run_name=built-cache",
    )
    assert train_pipeline.main(args) == 0
    assert seen == [str(tmp_path / "cache")]
