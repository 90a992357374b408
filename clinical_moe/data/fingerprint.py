"""The fingerprint of a cache: a hash of every setting that decides its content, and its inputs.

Every consumer compares the run's fingerprint with the one a cache was written with: ``train``
rebuilds a stale cache, ``evaluate`` / ``attribute`` refuse one (:func:`stale_reason` names what
differs, e.g. ``data.task: ihm48 -> los7``). The inputs are stored beside the hash
(``fingerprint.json`` and ``summary.json["fingerprint_inputs"]``) so that the difference can be
named; caches written before they were stored still compare by hash.

The hash of a config that uses none of the newer options (embeddings, a Hugging Face tokenizer,
the decode engine) is the one earlier versions computed, except that the size and modification
time of the source tables now count (:func:`source_tables`): a cache written before they did is
rebuilt once by ``train``, which says so ("source tables: not recorded").
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from hashlib import sha256
from pathlib import Path

from clinical_moe.config import Config, split_seed

#: Data settings that decide where or how fast the cache is written, not what it holds.
NOT_CONTENT = ("cache_dir", "workers", "engine", "decode_store", "ray_address")
#: Newer data settings left out of the inputs while at their default (keeps old hashes valid).
NEW_DEFAULTS = {"embeddings": ({}, None)}
#: Files of a Hugging Face tokenizer directory whose bytes define its vocabulary.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def hf_notes_path(cfg: Config) -> str | None:
    """``hf_path`` of the notes encoder when it is a Hugging Face backbone (its tokenizer is used)."""
    if "notes" not in cfg.data.modalities:
        return None
    spec = cfg.model.encoders.get("notes") or {}
    if spec.get("backbone") != "hf":
        return None
    return spec.get("hf_path") or None


def tokenizer_identity(path: str | Path) -> str:
    """A hash of a tokenizer directory's vocabulary files (the same vocabulary anywhere = same id).

    Raises:
        FileNotFoundError: ``path`` holds none of :data:`TOKENIZER_FILES`.
    """
    path = Path(path)
    h = sha256()
    found = False
    for name in TOKENIZER_FILES:
        f = path / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes())
    if not found:
        raise FileNotFoundError(
            f"hf_path {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "save the tokenizer beside the model (tokenizer.save_pretrained(path)); nothing is "
            "downloaded"
        )
    return h.hexdigest()[:16]


#: Endings of the table files whose size and modification time enter the fingerprint.
TABLE_SUFFIXES = (".csv", ".csv.gz", ".parquet")
#: Folders of ``data.root`` besides the releases whose tables a cache holds (the synthetic truth).
EXTRA_TABLE_DIRS = ("truth",)


def source_tables(root: str | Path, modalities) -> dict[str, list[int]]:
    """``{path under root: [bytes, mtime ns]}`` of every table the releases of ``modalities`` hold.

    Tables sit at most two folders deep in every release (``mimic-iv/hosp/*.csv.gz``,
    ``mimic-cxr/*.csv.gz``, ``mimic-iv-note/note/*.csv.gz``), so only those two levels are
    listed: images and waveforms (hundreds of thousands of files) are never walked. A replaced,
    regenerated or updated release at the same path changes these and makes the cache stale.
    """
    from clinical_moe.data.plan import RELEASES

    root = Path(root)
    dirs = [RELEASES[m] for m in modalities if m in RELEASES] + list(EXTRA_TABLE_DIRS)
    out: dict[str, list[int]] = {}
    for name in dirs:
        base = root / name
        if not base.is_dir():
            continue
        for pattern in ("*", "*/*"):
            for path in base.glob(pattern):
                if path.name.endswith(TABLE_SUFFIXES) and path.is_file():
                    st = path.stat()
                    out[path.relative_to(root).as_posix()] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(out.items()))


def fingerprint_inputs(cfg: Config) -> dict:
    """Everything that decides the cache content, as a flat JSON-able dict.

    The data section (less :data:`NOT_CONTENT`), the seed (it decides the split), the native
    targets' format version, the EHR statistics' version (with EHR), the notes tokenizer when it
    is a Hugging Face model's own, the size / modification time of each ``data.embeddings`` file,
    and those of the source tables (:func:`source_tables`).
    """
    from clinical_moe.data.cache_writer import EHR_STATS_VERSION
    from clinical_moe.data.targets import TARGETS_VERSION

    d = asdict(cfg.data)
    for key in NOT_CONTENT:
        d.pop(key, None)
    for key, defaults in NEW_DEFAULTS.items():
        if key in d and any(d[key] == v for v in defaults):
            d.pop(key)
    # The split it holds, however it was asked for: seed=1 with data.split_seed=0 reads the
    # cache that seed=0 built.
    d.pop("split_seed", None)
    d["seed"] = split_seed(cfg)
    d["targets_version"] = TARGETS_VERSION if cfg.data.native_targets else None
    if "ehr" in cfg.data.modalities:
        d["ehr_stats_version"] = EHR_STATS_VERSION
    if d.get("embeddings"):  # the files' size and time: new vectors at the same path count
        from clinical_moe.data.embeddings import source_paths

        d["embedding_files"] = {
            str(p): [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else None
            for spec in d["embeddings"].values()
            for p in source_paths(spec)
        }
    hf = hf_notes_path(cfg)
    if hf is not None:
        d["notes_tokenizer"] = f"hf:{tokenizer_identity(hf)}"
    tables = source_tables(cfg.data.root, cfg.data.modalities)
    if tables:  # (a root with no tables yet keeps the hash earlier versions wrote)
        d["source_tables"] = tables
    return d


def fingerprint_of(inputs: dict) -> str:
    """The 16-hex-digit hash of :func:`fingerprint_inputs`."""
    return sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_fingerprint(cfg: Config) -> str:
    """The fingerprint a cache built from ``cfg`` carries."""
    return fingerprint_of(fingerprint_inputs(cfg))


def stored(cache_dir: str | Path) -> tuple[str | None, dict | None]:
    """``(fingerprint, inputs)`` a finished cache was written with (None where not recorded)."""
    summary = Path(cache_dir) / "summary.json"
    if not summary.is_file():
        return None, None
    s = json.loads(summary.read_text())
    return s.get("fingerprint"), s.get("fingerprint_inputs")


def _name(key: str) -> str:
    if key in ("seed", "targets_version"):
        return key
    if key == "ehr_stats_version":
        return "EHR scaling version (2: age standardised)"
    if key == "notes_tokenizer":
        return "notes tokenizer"
    return f"data.{key}"


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _tables_differ(old: dict | None, new: dict) -> str:
    """``"source tables changed: mimic-iv/hosp/admissions.csv.gz (+2 more)"``."""
    if old is None:
        return "source tables: not recorded (a cache from an earlier version)"
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    first = changed[0]
    what = "new" if first not in old else "gone" if first not in new else "changed"
    more = f" (+{len(changed) - 1} more)" if len(changed) > 1 else ""
    return f"source tables changed: {first} {what}{more}"


def describe(old: dict, new: dict) -> str:
    """``"data.task: ihm48 -> los7, seed: 0 -> 1"``: the settings that differ, cache -> run."""
    parts = []
    if old.get("source_tables") != new.get("source_tables"):
        parts.append(_tables_differ(old.get("source_tables"), new.get("source_tables") or {}))
    old = {k: v for k, v in old.items() if k != "source_tables"}
    new = {k: v for k, v in new.items() if k != "source_tables"}
    for key in sorted(set(old) | set(new)):
        unset = "word-level" if key == "notes_tokenizer" else "<unset>"
        a, b = old.get(key, unset), new.get(key, unset)
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            parts.append(f"{_name(key)}: {_short(a)} -> {_short(b)}")
    return ", ".join(parts)


def _recorded_inputs(cache_dir: Path) -> dict:
    """The fingerprint inputs a cache recorded (finished: :func:`stored`; started:
    fingerprint.json)."""
    inputs = stored(cache_dir)[1]
    started = cache_dir / "fingerprint.json"
    if inputs is None and started.is_file():
        inputs = json.loads(started.read_text()).get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def spelt_as_cached(cfg: Config, cache_dir: str | Path | None = None) -> Config:
    """``cfg`` with ``data.root`` written as the cache recorded it, when both name one folder.

    ``runs/demo/corpus`` run from the repository root, the absolute path that ``make demo``
    records, and a symlink to the corpus all read the same release: a cache is not stale for
    any of them. The source tables' sizes and times still count (:func:`source_tables`).
    """
    old = _recorded_inputs(Path(cache_dir or cfg.data.cache_dir)).get("root")
    new = cfg.data.root
    if not isinstance(old, str) or old == new:
        return cfg
    try:
        same = Path(new).exists() and Path(old).resolve() == Path(new).resolve()
    except OSError:
        same = False
    return replace(cfg, data=replace(cfg.data, root=old)) if same else cfg


def stale_reason(cfg: Config, cache_dir: str | Path | None = None) -> str | None:
    """What differs between the cache and ``cfg`` (None when it matches or carries no fingerprint).

    A cache with no fingerprint (written by a test helper, or by hand) cannot be checked and is
    taken as it is. ``data.root`` counts as the same when it names the same folder
    (:func:`spelt_as_cached`).
    """
    cache_dir = Path(cache_dir or cfg.data.cache_dir)
    cfg = spelt_as_cached(cfg, cache_dir)
    old_fp, old_inputs = stored(cache_dir)
    if old_fp is None:
        return None
    new_inputs = fingerprint_inputs(cfg)
    new_fp = fingerprint_of(new_inputs)
    if old_fp == new_fp:
        return None
    if old_inputs is not None:
        return describe(old_inputs, new_inputs) or f"fingerprint {old_fp} -> {new_fp}"
    summary = json.loads((cache_dir / "summary.json").read_text())
    known = {"task": summary.get("task"), "modalities": summary.get("modalities")}
    named = describe(known, {k: new_inputs.get(k) for k in known})
    return named or f"data settings (fingerprint {old_fp} -> {new_fp}; an older cache)"
