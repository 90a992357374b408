"""Config loading: types, includes, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from clinical_moe.config import ConfigError, flatten, load_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=0.005", "model.name=concat", "data.modalities=[ehr, cxr]"])
    assert cfg.train.lr == 0.005 and cfg.model.name == "concat"
    assert cfg.data.modalities == ["ehr", "cxr"]
    assert flatten(cfg)["train.lr"] == 0.005


def test_yaml_with_include(tmp_path):
    (tmp_path / "data.yaml").write_text("data:\n  task: los3\n  window_hours: 24\n")
    (tmp_path / "run.yaml").write_text("include: data.yaml\nseed: 3\ntrain:\n  epochs: 2\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.seed, cfg.data.task, cfg.data.window_hours, cfg.train.epochs) == (
        3,
        "los3",
        24.0,
        2,
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr' (did you mean 'lr'?)"),
        ("trian.lr=0.1", "did you mean 'train'"),
        ("train.epochs=many", "train.epochs: expected int"),
        ("train.epochs=0", "train.epochs: must be >= 1"),
        ("model.name=fusemo", "model.name: unknown model 'fusemo'"),
        ("model.head={hiden: 3}", "model.head.hiden"),
        ("data.task=ihm24", "data.task"),
        ("train", "must look like key.sub=value"),
    ],
)
def test_errors_name_the_key(override, message):
    base = ["model.name=concat"] if not override.startswith("model.name") else []
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, override])
    assert message in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
