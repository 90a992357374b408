"""A synthetic MIMIC-style corpus whose generative story is known.

:func:`generate_corpus` writes MIMIC-IV (hosp / icu), MIMIC-CXR (DICOM), MIMIC-IV-ECG (WFDB) and
MIMIC-IV-Note files in exactly the real layouts, plus ``truth/`` (latent factors, true risk, which
modality carries which factor). :func:`sample_truth` gives the same per-stay truth without writing
anything. The generative story and its coefficients are in :mod:`.latents`.

Example:
    >>> from clinical_moe.data.synthetic import generate_corpus
    >>> summary = generate_corpus("/tmp/synth", n_patients=200, seed=0, image_size=(64, 96))
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from clinical_moe.data.synthetic.config import SynthConfig
from clinical_moe.data.synthetic.latents import effects_description
from clinical_moe.data.synthetic.schema import TABLE_PATHS
from clinical_moe.data.synthetic.truth import oracle_auroc, sample_truth

__all__ = ["CorpusSummary", "SynthConfig", "generate_corpus", "oracle_auroc", "sample_truth"]


@dataclass
class CorpusSummary:
    """What :func:`generate_corpus` wrote (counts, timing, headline truth figures)."""

    out_dir: Path
    n_patients: int
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    # Stays in the ihm48 cohort, its mortality prevalence and the oracle AUROC on it.
    n_ihm48: int = 0
    prevalence_ihm48: float = float("nan")
    oracle_auroc_ihm48: float = float("nan")
    # Fraction of root-cohort stays with each modality inside the pairing window.
    presence: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable summary lines (counts only: no patient text)."""
        c = self.counts
        return [
            f"synthetic corpus in {self.out_dir} ({self.seconds:.1f} s)",
            f"  patients {c.get('patients', 0)}, admissions {c.get('admissions', 0)}, "
            f"ICU stays {c.get('icustays', 0)}",
            f"  chartevents {c.get('chartevents', 0)}, labevents {c.get('labevents', 0)}, "
            f"impossible chart values {c.get('impossible_values', 0)}",
            f"  CXR studies {c.get('cxr_chexpert', 0)}, DICOM files {c.get('dicom_files', 0)}; "
            f"ECGs {c.get('ecg_records', 0)}; radiology notes {c.get('radiology', 0)}, "
            f"discharge notes {c.get('discharge', 0)}",
            f"  ihm48 cohort {self.n_ihm48} stays, mortality {self.prevalence_ihm48:.3f}, "
            f"oracle AUROC {self.oracle_auroc_ihm48:.3f}",
            "  presence (root cohort): "
            + ", ".join(f"{k} {v:.2f}" for k, v in self.presence.items()),
            f"  truth (keep away from models): {self.out_dir / 'truth'}",
        ]


def generate_corpus(
    out_dir: str | Path,
    n_patients: int = 200,
    seed: int = 0,
    workers: int | None = None,
    image_size: tuple[int, int] = (512, 1024),
    quiet: bool = False,
    overwrite: bool = False,
    **config,
) -> CorpusSummary:
    """Write a synthetic MIMIC-style corpus to ``out_dir``.

    Args:
        out_dir: output folder; gets ``mimic-iv/``, ``mimic-cxr/``, ``mimic-iv-ecg/``,
            ``mimic-iv-note/`` and ``truth/``.
        n_patients: number of patients.
        seed: master seed; the same seed (and config) gives byte-identical files.
        workers: worker processes (default min(2, cpu count)); never changes the output.
        image_size: (min, max) side of the radiographs in pixels; use e.g. (64, 96) in tests.
        quiet: hide the progress bar.
        overwrite: remove the generator's folders in ``out_dir`` first when they exist.
        **config: other :class:`SynthConfig` fields (``shard_size``, ``write_images``, ...).

    Returns:
        A :class:`CorpusSummary`.

    Raises:
        FileExistsError: when ``out_dir`` already holds a corpus and ``overwrite`` is False.
    """
    cfg = SynthConfig(
        n_patients=n_patients,
        seed=seed,
        workers=workers,
        image_size=(int(image_size[0]), int(image_size[1])),
        quiet=quiet,
        **config,
    )
    return generate_from_config(cfg, out_dir, overwrite=overwrite)


def generate_from_config(
    cfg: SynthConfig, out_dir: str | Path, overwrite: bool = False
) -> CorpusSummary:
    """:func:`generate_corpus` taking a ready :class:`SynthConfig`."""
    from clinical_moe.data.synthetic.writer import PARTS_DIR, run_shards

    cfg.validate()
    root = Path(out_dir)
    owned = ["mimic-iv", "mimic-cxr", "mimic-iv-ecg", "mimic-iv-note", "truth", PARTS_DIR]
    existing = [d for d in owned if (root / d).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{root} already holds {existing}; pass overwrite=True "
            "(--overwrite) or choose another folder"
        )
    for d in existing:
        shutil.rmtree(root / d)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts = run_shards(cfg, root)
    stays = pd.read_csv(root / TABLE_PATHS["truth_stays"])
    cohort = stays[stays["in_ihm48"] == 1]
    root_cohort = stays[stays["in_root_cohort"] == 1]
    summary = CorpusSummary(
        out_dir=root,
        n_patients=cfg.n_patients,
        seconds=0.0,
        counts=counts,
        n_ihm48=len(cohort),
        prevalence_ihm48=float(cohort["label_mortality"].mean()) if len(cohort) else float("nan"),
        oracle_auroc_ihm48=oracle_auroc(stays),
        presence={
            m: float(root_cohort[f"has_{m}"].mean()) if len(root_cohort) else float("nan")
            for m in ("ehr", "cxr", "ecg", "notes")
        },
    )
    effects = effects_description()
    effects["config"] = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in asdict(replace(cfg, workers=None, quiet=False)).items()
    }
    effects["summary"] = {
        "n_ihm48": summary.n_ihm48,
        "prevalence_ihm48": summary.prevalence_ihm48,
        "oracle_auroc_ihm48": summary.oracle_auroc_ihm48,
        "presence_root_cohort": summary.presence,
    }
    (root / "truth" / "effects.json").write_text(
        json.dumps(effects, indent=2, sort_keys=True) + "\n"
    )
    summary.seconds = time.perf_counter() - start
    return summary
