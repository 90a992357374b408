"""Typed configs: YAML -> dataclasses -> plain keyword arguments for builders.

``load_config(path, overrides)`` reads a YAML file (which may ``include`` others, e.g. a data
config), applies ``key.sub=value`` overrides, and returns a :class:`Config`. Unknown keys and
values of the wrong type are errors that name the key (and the closest valid key), raised before any
work starts. ``nn.Module`` s never see these objects: builders unpack them into keyword arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clinical_moe.registry import closest


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


@dataclass
class DataConfig:
    """Where the data lives and how stays become model inputs."""

    root: str = "runs/demo/corpus"  # raw corpus root holding mimic-iv/, mimic-cxr/, mimic-iv-ecg/, mimic-iv-note/
    cache_dir: str = "runs/demo/cache"  # preprocessed arrays + manifest (built when absent)
    task: str = "ihm48"  # ihm48 | los3 | los7 | phenotype
    modalities: list[str] = field(default_factory=lambda: ["ehr", "cxr", "ecg", "notes"])
    window_hours: float = 48.0  # inputs come from [intime, intime + window]
    cxr_view_positions: list[str] | None = None  # e.g. ["AP"]; None keeps every view
    max_events: int = 1  # images / ECGs / notes kept per stay (the latest ones)
    image_size: int = 64  # CXR side after resizing (224 for real backbones)
    ecg_samples: int = 1250  # ECG length fed to the model after decimation (5000 = full 500 Hz)
    note_max_len: int = 128  # tokens per note
    note_vocab: int = 5000  # tokenizer vocabulary size (fitted on the train split)
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    # Seed of the patient-level train / val / test split; None: the run's top-level ``seed``.
    # Set it to train several model seeds (``seed=1``, ``seed=2``, ...) on one split and cache.
    split_seed: int | None = None
    workers: int = 2  # preprocessing processes
    # Issue 13: files are decoded once into a store keyed by file + decode settings, shared by
    # every task / seed / window (default: a "decoded" folder beside cache_dir).
    decode_store: str | None = None
    engine: str = "pool"  # where decoding runs: pool (local processes) | ray (pip install .[ray])
    ray_address: str | None = (
        None  # ray.init(address=...): "auto", "ray://host:10001"; None = local
    )
    variables_file: str | None = None  # custom variable map CSV (default: the packaged one)
    # Modality-native per-event targets (clinical_moe.data.targets): CheXpert findings per CXR,
    # machine statements + intervals per ECG, stored in the cache for encoder training.
    native_targets: bool = True  # read the label files when present (absent -> no targets)
    cxr_label_source: str = "chexpert"  # chexpert | negbio (mimic-cxr-2.0.0-<source>.csv.gz)
    chexpert_uncertain: str = "ignore"  # -1 labels: ignore (NaN) | ones | zeros
    chexpert_blank: str = "zero"  # blank (not mentioned): zero (negative) | ignore (NaN)
    # Precomputed per-event embeddings (issue 13): modality -> PATH or [PATH, ...] (Parquet, or
    # .npy + an ids file), keyed by dicom_id (cxr), study_id (ecg) or note_id (notes); several
    # sources are concatenated. They replace that modality's decoded files in the cache.
    embeddings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = {
            "cxr_label_source": ("chexpert", "negbio"),
            "chexpert_uncertain": ("ignore", "ones", "zeros"),
            "chexpert_blank": ("zero", "ignore"),
            "engine": ("pool", "ray"),
        }
        if self.split_seed is not None and (
            isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int)
        ):
            raise ConfigError(f"data.split_seed: an integer or null, got {self.split_seed!r}")
        for m, paths in self.embeddings.items():
            if m not in ("cxr", "ecg", "notes"):
                raise ConfigError(f"data.embeddings.{m}: embeddings are read for cxr, ecg, notes")
            ok = isinstance(paths, str) or (
                isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths)
            )
            if not ok:
                raise ConfigError(f"data.embeddings.{m}: give a path or a list of paths")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"data.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}"
                )


@dataclass
class ModelConfig:
    """Which head and encoders to build (see ``clinical_moe.create_model``)."""

    name: str = "fusemoe"  # a name from clinical_moe.list_models()
    d_model: int = 32  # shared token width D
    num_tokens: int = 4  # tokens per modality T
    encoders: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # per-modality encoder options
    head: dict[str, Any] = field(
        default_factory=dict
    )  # head options (the head's constructor kwargs)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-2
    scheduler: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Which weights the run keeps (best.pt: what evaluate / attribute / the MLflow model use).
    # "final": every epoch of the schedule, the last (cosine-annealed) weights; val AUROC is still
    # logged each epoch. "best_val_auroc": the epoch of best val AUROC, early stopping after
    # `patience` epochs without improvement. "final" is the default because attributions read the
    # model's log-odds under every coalition of modalities, and those keep improving after val
    # AUROC has peaked (issue 12, 20k benchmark: single-factor faithfulness >= 0.90 for 16 of 21
    # head-seeds against 9 of 21, the same natural AUROC / ceiling; on the 4 worst runs, their own
    # final weights beat their best-AUROC epoch's by +0.06 to +0.15 at test AUROC within 0.003).
    # One run each: a new model seed moves a run's figure by up to 0.21 (README, run-to-run spread).
    select: str = "final"
    patience: int = 5  # select=best_val_auroc: early stopping on validation AUROC
    # Exponential moving average of the weights (torch.optim.swa_utils.AveragedModel), updated
    # after every optimizer step: w_ema <- decay * w_ema + (1 - decay) * w. 0 = off. When on,
    # validation, best.pt and everything downstream (evaluate, attribute, the MLflow model) use
    # the averaged weights; last.pt keeps both, so --resume is exact. Buffers (ConfSMoE's running
    # means) are the live model's. The time constant is 1 / (1 - decay) steps: choose it below an
    # epoch's steps so the average is of well-trained weights.
    ema_decay: float = 0.0
    # Train-time modality dropout, on by default for every head (baselines too, so comparisons
    # stay fair): each present modality, EHR included, is dropped w.p. p, at least one kept --
    # drawn like evaluation's MCAR masks -- so the "modality absent" paths (missing embeddings,
    # Flex-MoE bank rows without EHR, ...) are trained. 0 trains on natural missingness only.
    modality_dropout: float = 0.3
    # Share of training samples shown exactly one of their modalities (uniformly chosen), so the
    # single-modality paths (CXR-only, ECG-only) are trained as often as evaluation tests them.
    single_modality_rate: float = 0.0
    sampler: str = "random"  # random | by_modality_count (Flex-MoE warm-up ordering)
    warmup_epochs: int = (
        0  # epochs ordered by number of observed modalities (sampler=by_modality_count)
    )
    num_workers: int = 0  # DataLoader workers
    checkpoint_dir: str = "runs/checkpoints"
    max_steps_per_epoch: int | None = None  # cap for smoke runs
    checkpoint_every: int = (
        50  # save last.pt every N optimizer steps (and at every epoch end); 0 = epoch ends only
    )
    device: str | None = None  # cpu | cuda | None (cuda when available)
    deterministic: bool = True  # torch.use_deterministic_algorithms(True, warn_only=True)
    num_threads: int | None = (
        None  # torch intra-op CPU threads; None = torch's default (1 helps on busy machines)
    )
    # Weight of each encoder's auxiliary loss on its modality-native per-event targets (CheXpert
    # findings per image, machine ECG statements per recording), added to the task loss. On by
    # default: the task label alone is too weak a teacher for image / waveform encoders. Applies
    # only where the cache has targets for the modality and its encoder trains; 0 turns it off.
    encoder_aux: dict[str, float] = field(default_factory=lambda: {"cxr": 1.0, "ecg": 1.0})


@dataclass
class PretrainConfig:
    """``clinical-moe pretrain``: each encoder alone on its modality's own per-event targets."""

    modalities: list[str] = field(default_factory=lambda: ["cxr", "ecg"])  # encoders to pretrain
    out_dir: str = "runs/pretrained"  # writes <out_dir>/<modality>.pt (+ .json)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-2
    patience: int = 3  # early stopping on the val mean AUROC of the binary targets (else loss)
    max_steps_per_epoch: int | None = None  # cap for smoke runs


@dataclass
class TrackingConfig:
    """Where runs are recorded (MLflow)."""

    uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "clinical_moe"
    run_name: str | None = (
        None  # MLflow run name and checkpoint subdirectory; None -> <head>-<config hash>
    )
    log_model: bool = (
        True  # log the trained model with mlflow.pytorch.log_model (slowish; off for smoke tests)
    )


@dataclass
class EvalConfig:
    """Evaluation under simulated missingness."""

    mechanisms: list[str] = field(
        default_factory=lambda: ["mcar", "mar", "mnar"]
    )  # mcar | mar | mnar (label) | mnar_content
    rates: list[float] = field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(10)]
    )  # drop rates of observed modalities, each in [0, 1]
    patterns: bool = True  # also every fixed non-empty modality subset
    bootstrap: int = 200  # bootstrap resamples for 95% CIs (0: no intervals)
    seed: int = 0  # seed of the masks and the bootstrap resamples (not of the model)
    batch_size: int = 128  # stays per encoder pass at evaluation
    ece_bins: int = 10  # equal-width bins of the expected calibration error
    mar_covariate: str = (
        "severity"  # severity (mean |z| of the EHR values) | age (EHR static feature 0)
    )
    strength: float = 1.0  # MAR / MNAR logistic slope per standard deviation of the covariate

    def __post_init__(self) -> None:
        from clinical_moe.missingness import MECHANISMS

        for m in self.mechanisms:
            if m not in MECHANISMS:
                raise ConfigError(
                    f"eval.mechanisms: unknown mechanism {m!r}{closest(m, MECHANISMS)}"
                )
        for r in self.rates:
            if not 0.0 <= float(r) <= 1.0:
                raise ConfigError(f"eval.rates: {r} is not in [0, 1]")
        if self.mar_covariate not in ("severity", "age"):
            raise ConfigError(f"eval.mar_covariate: {self.mar_covariate!r} is not severity or age")
        if self.bootstrap < 0 or self.batch_size < 1 or self.ece_bins < 1:
            raise ConfigError("eval.bootstrap must be >= 0, eval.batch_size and eval.ece_bins >= 1")


@dataclass
class Config:
    """A whole run."""

    seed: int = 0  # makes a CPU run reproducible; draws the split too unless data.split_seed
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def split_seed(cfg: Config) -> int:
    """The seed of the run's train / val / test split: ``data.split_seed``, else ``seed``."""
    return cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed


# ---------------------------------------------------------------------------------------------
# Loading


def _deep_merge(base: dict, new: Mapping) -> dict:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


#: The configs shipped with the package (``clinical-moe configs list``).
PACKAGED = Path(__file__).with_name("configs")


def packaged_configs() -> list[str]:
    """Names of the shipped configs, e.g. ``tiny/fusemoe.yaml``, sorted."""
    return sorted(p.relative_to(PACKAGED).as_posix() for p in PACKAGED.rglob("*.yaml"))


def find_config(name: str | Path, base: Path | None = None) -> Path:
    """The one rule for config paths: a file path first, then a packaged config name.

    ``name`` is tried as given (relative to ``base``, the including file's folder, for an
    ``include``; else to the working folder), then as a packaged name (``tiny/fusemoe``,
    ``tiny/fusemoe.yaml``, or a relative ``.../configs/<name>``); an absolute path is only ever
    itself. An include's ``../data/x.yaml`` is thus found beside a packaged config and beside a
    copy made by ``clinical-moe configs cp``. Paths *inside* a config (``data.root``,
    ``data.cache_dir``, ``train.checkpoint_dir``) are relative to the working folder.
    """
    path = Path(name)
    here = (base / path) if base is not None and not path.is_absolute() else path
    if here.is_file() or path.is_absolute():
        return here
    parts = [p for p in path.parts if p not in ("..", ".")]
    if "configs" in parts:  # configs/tiny/x.yaml from another folder (e.g. notebooks/)
        parts = parts[len(parts) - parts[::-1].index("configs") :]
    text = "/".join(parts)
    for c in (text, f"{text}.yaml"):
        if text and (PACKAGED / c).is_file():
            return PACKAGED / c
    return here


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = find_config(path).resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle")
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path} (nor a packaged config; `clinical-moe configs list` "
            "names them)"
        )
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    merged: dict = {}
    includes = raw.pop("include", []) or []
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = _deep_merge(merged, _read_yaml(find_config(inc, path.parent), (*seen, path)))
    return _deep_merge(merged, raw)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    d[keys[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["train.lr=1e-3", "model.head={top_k: 2}"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        _set_dotted(out, key.strip(), yaml.safe_load(value))
    return out


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Coerce / validate ``value`` against the annotation ``tp``; raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a valid {tp}")
    if tp is Any:
        return value
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp in (int, float, bool, str):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Mapping, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r}{closest(str(key), fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}: expected a section (mapping), got {value!r}")
            kwargs[key] = _build(tp, value, f"{name}.")
        else:
            kwargs[key] = _check_type(name, value, tp)
    return cls(**kwargs)


def load_config(
    source: str | Path | Mapping | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Load and validate a run config.

    Args:
        source: A YAML path, an already-parsed mapping, or None for the defaults.
        overrides: ``key.sub=value`` strings applied last (values parsed as YAML).

    Raises:
        ConfigError: for unknown keys (naming the closest valid one), wrong types, or bad values.
    """
    if source is None:
        data: dict = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = _read_yaml(Path(source))
    data = _deep_merge(data, parse_overrides(overrides))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need more than types: names exist in registries, values are in range."""
    from clinical_moe.model import list_models
    from clinical_moe.registry import HEADS

    if cfg.model.name not in list_models():
        raise ConfigError(
            f"model.name: unknown model {cfg.model.name!r}{closest(cfg.model.name, list_models())}"
        )
    import inspect

    params = inspect.signature(HEADS.get(cfg.model.name)).parameters
    reserved = {"modalities", "d_model", "num_classes", "num_tokens"}
    for key in cfg.model.head:
        if key in reserved or key not in params:
            valid = [p for p in params if p not in reserved and p != "self"]
            raise ConfigError(f"unknown config key 'model.head.{key}'{closest(key, valid)}")
    if not cfg.data.modalities:
        raise ConfigError("data.modalities: at least one modality is required")
    _validate_modalities_and_head(cfg)
    if cfg.data.task not in ("ihm48", "los3", "los7", "phenotype"):
        raise ConfigError(f"data.task: unknown task {cfg.data.task!r}")
    if cfg.train.scheduler not in ("cosine", "constant"):
        raise ConfigError(
            f"train.scheduler: {cfg.train.scheduler!r} is not one of cosine, constant"
        )
    if cfg.train.select not in ("final", "best_val_auroc"):
        raise ConfigError(f"train.select: {cfg.train.select!r} is not final or best_val_auroc")
    if cfg.train.sampler not in ("random", "by_modality_count"):
        raise ConfigError(
            f"train.sampler: {cfg.train.sampler!r} is not random or by_modality_count"
        )
    for name, value in (
        ("train.epochs", cfg.train.epochs),
        ("train.batch_size", cfg.train.batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if cfg.train.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every: must be >= 0, got {cfg.train.checkpoint_every}")
    if cfg.train.device is not None and cfg.train.device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: {cfg.train.device!r} is not cpu, cuda or cuda:N")
    if not 0.0 <= cfg.train.modality_dropout < 1.0:
        raise ConfigError("train.modality_dropout: must be in [0, 1)")
    if not 0.0 <= cfg.train.single_modality_rate <= 1.0:
        raise ConfigError("train.single_modality_rate: must be in [0, 1]")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    _validate_encoder_aux(cfg)
    if abs(sum(cfg.data.split_fractions) - 1.0) > 1e-6 or len(cfg.data.split_fractions) != 3:
        raise ConfigError("data.split_fractions: three fractions (train, val, test) summing to 1")


#: Modalities the data pipeline can read (one MIMIC release each).
DATA_MODALITIES = ("ehr", "cxr", "ecg", "notes")


def _validate_modalities_and_head(cfg: Config) -> None:
    """Modality names exist, and the head accepts its arguments (built once, on CPU, tiny).

    Runs before any data work or tracking run, so that e.g. ``model.head.top_k=9`` with 4
    experts fails at once, naming the key.
    """
    mods = list(cfg.data.modalities)
    for m in mods:
        if m not in DATA_MODALITIES:
            raise ConfigError(
                f"data.modalities: unknown modality {m!r}{closest(str(m), DATA_MODALITIES)}; "
                f"choose from {', '.join(DATA_MODALITIES)}"
            )
    if len(set(mods)) != len(mods):
        raise ConfigError(f"data.modalities: a modality is listed twice in {mods}")
    from clinical_moe.registry import HEADS

    try:
        HEADS.get(cfg.model.name)(
            modalities=tuple(mods),
            d_model=cfg.model.d_model,
            num_classes=1,
            num_tokens={m: cfg.model.num_tokens for m in mods},
            **cfg.model.head,
        )
    except (ValueError, TypeError, AssertionError) as err:
        head = ", ".join(f"model.head.{k}={v!r}" for k, v in cfg.model.head.items())
        raise ConfigError(
            f"model: the {cfg.model.name!r} head rejects its settings ({head or 'defaults'}, "
            f"model.d_model={cfg.model.d_model}): {err}"
        ) from None


def _validate_encoder_aux(cfg: Config) -> None:
    """``train.encoder_aux`` weights are numbers >= 0 keyed by modality names."""
    from clinical_moe.types import DEFAULT_MODALITIES

    known = list(dict.fromkeys([*cfg.data.modalities, *DEFAULT_MODALITIES]))
    for key, w in cfg.train.encoder_aux.items():
        if key not in known:
            raise ConfigError(f"train.encoder_aux: unknown modality {key!r}{closest(key, known)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(f"train.encoder_aux.{key}: must be a number >= 0, got {w!r}")
    p = cfg.pretrain
    if p.epochs < 1 or p.batch_size < 1 or p.patience < 1:
        raise ConfigError("pretrain.epochs, pretrain.batch_size and pretrain.patience must be >= 1")


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts (for YAML dumps and MLflow artifacts)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Config | Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``: dotted keys, for MLflow params."""
    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
