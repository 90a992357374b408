"""Pretrain each event encoder alone on its modality's own per-event targets.

The task label (e.g. in-hospital mortality) is too weak a teacher for image and waveform encoders;
each CXR study has its CheXpert findings and each ECG its machine statements. For every selected
modality this trains the encoder's backbone + per-event target head (no tokens, no fusion head) on
the train split's events, early-stops on the val split (mean AUROC over the binary targets, or the
loss when none is defined), logs params / per-epoch losses / per-target val AUROC / the weights
file to MLflow, and writes ``<out_dir>/<modality>.pt``: a state dict (under ``"state_dict"``, with
the encoder options, target names and val metrics beside it) that loads with
``torch.load(..., weights_only=True)`` and that any head's config reuses::

    model:
      encoders:
        cxr: {pretrained: runs/pretrained/cxr.pt, freeze: backbone}   # or freeze: true

``freeze: backbone`` keeps the token projection trainable, so one pretrained backbone serves every
head whatever its ``d_model`` / ``num_tokens``: the documented route for comparing heads.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from clinical_moe.config import Config, flatten
from clinical_moe.data.dataset import CachedDataset, Collator
from clinical_moe.metrics import auroc
from clinical_moe.model import build_encoders
from clinical_moe.tracking import NullLogger, RunLogger
from clinical_moe.training.checkpoint import seed_everything
from clinical_moe.training.engine import cache_targets, encoder_options, seeded
from clinical_moe.training.losses import event_target_loss

log = logging.getLogger("clinical_moe.pretrain")


def metric_name(target: str) -> str:
    """A target name as an MLflow-safe metric key (``"Pleural Effusion"`` -> ``Pleural_Effusion``)."""
    return re.sub(r"[^\w\-.]+", "_", target).strip("_") or "target"


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class EncoderPretrainer:
    """One modality's encoder trained on its per-event targets.

    Args:
        cfg: The run config (``model`` gives the encoder options, ``pretrain`` the loop settings).
        modality: Which encoder.
        cache_dir: A finished cache whose summary lists targets for ``modality``.
        logger: Metrics sink (MLflow in the pipeline).
        quiet: No progress bars.
    """

    def __init__(
        self,
        cfg: Config,
        modality: str,
        cache_dir: str | Path,
        logger: RunLogger | None = None,
        quiet: bool = False,
    ) -> None:
        self.cfg, self.modality, self.quiet = cfg, modality, quiet
        self.logger = logger or NullLogger()
        p = cfg.pretrain
        self.train_set = CachedDataset(cache_dir, "train", [modality])
        self.val_set = CachedDataset(cache_dir, "val", [modality])
        targets, continuous = cache_targets(self.train_set.store)
        if not targets.get(modality):
            raise ValueError(
                f"the cache {cache_dir} has no per-event targets for {modality!r} "
                f"(summary 'targets': {sorted(targets)}); rebuild it from a corpus with the "
                "modality's label files (CheXpert labels for cxr, machine measurements for ecg)"
            )
        self.targets = targets[modality]
        self.continuous = continuous[modality]
        spec = encoder_options(cfg, self.train_set.store.summary.get("encoder_kwargs", {}) or {})
        spec = dict(spec.get(modality, {}))
        for key in ("pretrained", "freeze"):
            if spec.pop(key, None) not in (None, False):
                log.info("pretrain %s: ignoring model.encoders.%s.%s", modality, modality, key)
        spec["num_targets"] = len(self.targets)
        self.spec = spec
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.seed, cfg.train.deterministic)
        dev = cfg.train.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        self.encoder = build_encoders(
            [modality], cfg.model.d_model, cfg.model.num_tokens, {modality: spec}
        )[modality].to(self.device)
        if not hasattr(self.encoder, "event_target_logits"):
            raise ValueError(f"the {modality!r} encoder has no per-event target head to pretrain")
        trainable = [q for n, q in self.encoder.named_parameters() if self._trained(n)]
        self.opt = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=p.weight_decay)

    def _trained(self, name: str) -> bool:
        return self.encoder.is_backbone(name) or name.startswith("target_head.")

    def loader(self, dataset: CachedDataset, shuffle: bool, epoch: int = 0) -> DataLoader:
        """Stays of ``dataset`` that have the modality, in batches."""
        rows = np.flatnonzero(dataset.present[:, 0]).tolist()
        return DataLoader(
            Subset(dataset, rows),
            batch_size=self.cfg.pretrain.batch_size,
            shuffle=shuffle,
            collate_fn=Collator(dataset),
            num_workers=self.cfg.train.num_workers,
            generator=seeded(self.cfg.seed, epoch, 23),
        )

    def _logits(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = {k: v.to(self.device) for k, v in batch.inputs[self.modality].items()}
        if "targets" not in inputs:
            raise ValueError(f"batches of {self.modality!r} carry no 'targets' (stale cache?)")
        logits = self.encoder.event_target_logits(inputs)  # (B, N, K)
        return logits, inputs["targets"], inputs["event_mask"].bool()

    def train_epoch(self, epoch: int) -> float:
        """One pass over the train split (``pretrain.max_steps_per_epoch`` caps it); mean loss."""
        self.encoder.train()
        cap = self.cfg.pretrain.max_steps_per_epoch
        total, count = 0.0, 0
        bar = tqdm(
            self.loader(self.train_set, True, epoch),
            disable=self.quiet,
            leave=False,
            desc=f"pretrain {self.modality} {epoch + 1}/{self.cfg.pretrain.epochs}",
        )
        for step, batch in enumerate(bar):
            if cap and step >= cap:
                break
            logits, targets, valid = self._logits(batch)
            loss, n = event_target_loss(logits, targets, valid, self.continuous)
            if n == 0:
                continue
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.cfg.train.grad_clip)
            self.opt.step()
            total, count = total + float(loss.detach()) * n, count + n
        bar.close()
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, dataset: CachedDataset | None = None, prefix: str = "val") -> dict:
        """Loss and per-target AUROC (binary targets) over the known targets of real events."""
        self.encoder.eval()
        logits, targets = [], []
        for batch in self.loader(dataset or self.val_set, False):
            lg, tg, valid = self._logits(batch)
            tg = torch.where(valid.unsqueeze(-1), tg.float(), torch.nan)  # (B, N, K)
            logits.append(lg.reshape(-1, lg.shape[-1]).float().cpu())
            targets.append(tg.reshape(-1, tg.shape[-1]).cpu())
        K = len(self.targets)
        lg = torch.cat(logits) if logits else torch.zeros(0, K)
        tg = torch.cat(targets) if targets else torch.zeros(0, K)
        loss, n = event_target_loss(
            lg[None], tg[None], torch.ones(1, len(lg), dtype=torch.bool), self.continuous
        )
        out = {f"{prefix}_loss": float(loss) if n else math.nan}
        aucs = []
        for k, name in enumerate(self.targets):
            known = torch.isfinite(tg[:, k])
            if self.continuous[k] or not bool(known.any()):
                continue
            a = auroc(tg[known, k].numpy(), torch.sigmoid(lg[known, k]).numpy())
            out[f"{prefix}_auroc/{metric_name(name)}"] = a
            if math.isfinite(a):
                aucs.append(a)
        out[f"{prefix}_mean_auroc"] = float(np.mean(aucs)) if aucs else math.nan
        return out

    def fit(self) -> dict:
        """Train with early stopping; the best epoch's weights stay in the encoder."""
        p = self.cfg.pretrain
        best, best_epoch, bad, best_state, history = -math.inf, -1, 0, None, []
        for epoch in range(p.epochs):
            start = time.perf_counter()
            metrics = {"train_loss": self.train_epoch(epoch), **self.evaluate()}
            metrics["epoch_seconds"] = time.perf_counter() - start
            score = metrics["val_mean_auroc"]
            score = score if math.isfinite(score) else -metrics["val_loss"]
            self.logger.log_metrics(metrics, step=epoch)
            history.append(metrics)
            log.info(
                "pretrain %s epoch %d: %s",
                self.modality,
                epoch + 1,
                {k: round(v, 4) for k, v in metrics.items() if "/" not in k},
            )
            if score > best:
                best, best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(self.encoder.state_dict())
            else:
                bad += 1
                if bad >= p.patience:
                    break
        if best_state is not None:
            self.encoder.load_state_dict(best_state)
        final = {f"best_{k}": v for k, v in self.evaluate().items()}
        final["best_epoch"] = float(best_epoch)
        self.logger.log_metrics(final, step=len(history))
        return {"best_epoch": best_epoch, "metrics": final, "history": history}

    def save(self, path: str | Path, result: dict) -> Path:
        """Write the weights (+ what they were trained on) and a readable ``.json`` beside them."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "modality": self.modality,
            "encoder_options": _json_safe({"d_model": self.cfg.model.d_model, **self.spec}),
            "targets": list(self.targets),
            "continuous": [bool(c) for c in self.continuous],
            "metrics": {k: float(v) for k, v in result["metrics"].items()},
        }
        state = {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"state_dict": state, **meta}, tmp)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return path


def pretrain_encoders(
    cfg: Config,
    modalities: list[str] | None = None,
    out_dir: str | Path | None = None,
    quiet: bool = True,
    tracking: bool = True,
) -> dict[str, dict]:
    """Pretrain the encoders of ``modalities`` (default ``cfg.pretrain.modalities``), one by one.

    Args:
        cfg: Run config; ``data.cache_dir`` must be a finished cache with per-event targets.
        modalities: Which encoders; each must be in ``data.modalities``' cache.
        out_dir: Where ``<modality>.pt`` goes (default ``cfg.pretrain.out_dir``).
        quiet: No progress bars.
        tracking: One MLflow run per modality (``cfg.tracking``); False logs nowhere.

    Returns:
        ``{modality: {"path", "run_id", "best_epoch", "metrics", "history"}}``.
    """
    from clinical_moe.tracking import MlflowLogger

    mods = list(modalities or cfg.pretrain.modalities)
    out = Path(out_dir or cfg.pretrain.out_dir)
    results: dict[str, dict] = {}
    for m in mods:
        logger = (
            MlflowLogger(
                cfg.tracking.uri, cfg.tracking.experiment, f"pretrain-{m}", log_model=False
            )
            if tracking
            else NullLogger()
        )
        try:
            trainer = EncoderPretrainer(cfg, m, cfg.data.cache_dir, logger, quiet)
            logger.set_tags({"stage": "pretrain", "modality": m})
            logger.log_params(
                {
                    **flatten(cfg.pretrain, "pretrain."),
                    **flatten(trainer.spec, f"encoder.{m}."),
                    "seed": cfg.seed,
                    "data.cache_dir": cfg.data.cache_dir,
                    "targets": ", ".join(trainer.targets),
                    "train_stays": int(trainer.train_set.present[:, 0].sum()),
                    "val_stays": int(trainer.val_set.present[:, 0].sum()),
                }
            )
            result = trainer.fit()
            path = trainer.save(out / f"{m}.pt", result)
            logger.log_artifact(path, "weights")
            logger.log_artifact(path.with_suffix(".json"), "weights")
        except BaseException:
            logger.close("FAILED")
            raise
        logger.close("FINISHED")
        results[m] = {"path": str(path), "run_id": logger.run_id, **result}
        log.info(
            "pretrained %s -> %s (best epoch %d, val mean AUROC %.4f)",
            m,
            path,
            result["best_epoch"] + 1,
            result["metrics"].get("best_val_mean_auroc", math.nan),
        )
    return results
