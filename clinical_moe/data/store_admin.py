"""Looking after a decode store: what it holds, and pruning what no build will read again.

The store (:mod:`~clinical_moe.data.decode_store`) only grows: a file replaced in place gets a
new key and is decoded again, new decode settings get a new folder, and a writer killed mid-write
leaves its temporary file. On MIMIC scale (hundreds of GB) a user needs to see and reclaim that:

- **leftover temporary files** of killed writers (``.<name>.<uuid>.tmp``), older than an age
  that no live writer reaches (default one hour, so a running build is never disturbed);
- **unreferenced images and ECGs** (mark and sweep): entries that no known cache refers to.
  The known caches are those beside the store (its default place is beside the caches) plus
  any named. An entry's key does not say which corpus it came from (two synthetic corpora share
  ids), so nothing is removed by its key alone;
- **folders of other settings** (another image size, ECG length, tokenizer, EHR window or
  table version), given the config whose folders are kept.

A cache whose folder was pruned is rebuilt by ``train`` and refused by ``evaluate`` (one line
naming the folder). A swept folder gets ``pruned.json``: a cache written before it has its
entries looked up, and one missing any is rebuilt by ``train`` and refused by ``evaluate`` too.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from clinical_moe.config import Config

#: Folder prefixes of a decode store.
KINDS = ("cxr", "ecg", "notes", "ehr")
#: Written into a folder that ``--unreferenced`` pruned: caches older than it look their entries up.
PRUNED = "pruned.json"


def store_folders(root: str | Path) -> list[Path]:
    """The store's folders (``<kind>-<digest>``), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no decode store at {root} (data.decode_store)")
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.split("-", 1)[0] in KINDS)


def _settings(folder: Path) -> dict:
    for name in ("settings.json", "meta.json"):
        f = folder / name
        if f.is_file():
            data = json.loads(f.read_text())
            return {k: v for k, v in data.items() if not isinstance(v, dict | list)}
    return {}


def _entries(folder: Path) -> list[Path]:
    """Entry files (``.npy`` and ``.skip.json``) of a cxr / ecg / notes folder."""
    return [p for p in folder.glob("*/*") if not p.name.startswith(".")]


def _key(entry: Path) -> str:
    return entry.name.removesuffix(".skip.json").removesuffix(".npy")


def find_caches(root: Path, extra: list[str | Path] = ()) -> list[Path]:
    """Caches that point into ``root``: those beside it (``decode_store.json``) and ``extra``."""
    from clinical_moe.data.store import read_pointer

    root = root.resolve()
    found = [p for p in root.parent.iterdir() if (p / "decode_store.json").is_file()]
    for path in extra:
        if not (Path(path) / "decode_store.json").is_file():
            raise FileNotFoundError(f"{path} is not a cache that refers to a decode store")
        found.append(Path(path))

    def uses_root(cache: Path) -> bool:
        return any(root in d.resolve().parents for d in read_pointer(cache).values())

    return sorted({c.resolve() for c in found if uses_root(c)})


def referenced(caches: list[Path]) -> dict[Path, set[str]]:
    """Store folder -> the keys the ``caches``' ``<m>_ref.npy`` arrays name."""
    import numpy as np

    from clinical_moe.data.store import read_pointer

    out: dict[Path, set[str]] = {}
    for cache in caches:
        for m, folder in read_pointer(cache).items():
            keys = out.setdefault(folder.resolve(), set())
            for ref in sorted((cache / "shards").glob(f"*/{m}_ref.npy")):
                arr = np.load(ref, allow_pickle=False)  # (n, N) str, "" for an empty slot
                keys.update(k for k in arr.ravel().tolist() if k)
    return out


def missing_entries_of(cache: Path) -> int:
    """How many of the entries a cache refers to are in neither form (array, skip record)."""
    from clinical_moe.data.decode_store import entry_state

    refs = referenced([cache]).items()
    return sum(entry_state(folder, k) is None for folder, keys in refs for k in keys)


def _temp_files(root: Path, older_than_s: float) -> list[Path]:
    """Temporary files and folders of writers that stopped, older than ``older_than_s``."""
    now = time.time()
    found = list(root.glob(".*.tmp")) + list(root.glob("*/*/.*.tmp"))
    return [p for p in found if now - p.stat().st_mtime > older_than_s]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def folder_report(folder: Path) -> dict:
    """What one store folder holds: its settings, entries, skips, superseded entries, size."""
    kind = folder.name.split("-", 1)[0]
    entries = _entries(folder) if kind != "ehr" else []
    return {
        "folder": folder.name,
        "kind": kind,
        "settings": _settings(folder),
        "entries": sum(p.name.endswith(".npy") for p in entries),
        "skips": sum(p.name.endswith(".skip.json") for p in entries),
        "mb": round(_size(folder) / 1024**2, 1),
    }


def current_folders(cfg: Config) -> set[str]:
    """Names of the store folders a build of ``cfg`` reads (what ``--other-settings`` keeps)."""
    from clinical_moe.data.decode_store import decode_settings, settings_name
    from clinical_moe.data.ehr_store import ehr_store_dir
    from clinical_moe.data.fingerprint import hf_notes_path, tokenizer_identity
    from clinical_moe.data.note_store import note_settings
    from clinical_moe.data.plan import RELEASES

    d = cfg.data
    names = {settings_name(decode_settings(m, d)) for m in ("cxr", "ecg") if m in d.modalities}
    hf = hf_notes_path(cfg)
    if hf is not None:
        names.add(settings_name(note_settings(tokenizer_identity(hf), d.note_max_len)))
    mimic_iv = Path(d.root) / RELEASES["ehr"]
    if mimic_iv.is_dir():
        names.add(ehr_store_dir(".", mimic_iv, d.variables_file, d.window_hours).name)
    return names


def prune_store(
    root: str | Path,
    keep: set[str] | None = None,
    caches: list[Path] | None = None,
    dry_run: bool = False,
    temp_age_s: float = 3600.0,
) -> dict:
    """Remove stale temporary files, unreferenced entries and (with ``keep``) other folders.

    Args:
        root: The decode store.
        keep: Folder names to keep (:func:`current_folders`); every other folder is removed.
            None keeps every folder.
        caches: Sweep the image and ECG folders: remove every entry none of these caches
            refers to (:func:`find_caches`), and every such folder none refers to. None sweeps
            nothing.
        dry_run: Count and list, remove nothing.
        temp_age_s: Temporary files younger than this belong to live writers and stay.

    Returns:
        ``{"temporary", "unreferenced", "folders", "removed_folders", "freed_mb"}``.
    """
    root = Path(root)
    folders = store_folders(root)
    doomed = [f for f in folders if keep is not None and f.name not in keep]
    temp = _temp_files(root, temp_age_s)
    unref: list[Path] = []
    if caches is not None:
        used = referenced(caches)
        for folder in folders:
            if folder in doomed or folder.name.split("-", 1)[0] not in ("cxr", "ecg"):
                continue
            if folder.resolve() not in used:
                doomed.append(folder)
                continue
            keys = used[folder.resolve()]
            unref += [e for e in _entries(folder) if _key(e) not in keys]
    freed = sum(_size(p) for p in temp + unref + doomed)
    if not dry_run:
        for path in temp + unref:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for folder in doomed:
            shutil.rmtree(folder, ignore_errors=True)
        for folder in {e.parent.parent for e in unref}:  # caches older than this check entries
            (folder / PRUNED).write_text(json.dumps({"time": time.time(), "removed": len(unref)}))
    return {
        "temporary": len(temp),
        "unreferenced": len(unref),
        "folders": len(doomed),
        "removed_folders": [f.name for f in doomed],
        "freed_mb": round(freed / 1024**2, 1),
    }
