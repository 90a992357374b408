"""The training loop: data, model, optimiser, epochs, validation, checkpoints. Read top to bottom.

One :class:`Trainer` per run. ``fit()`` trains with the task loss + the head's ``aux_loss``, AdamW,
a cosine (with warm-up) or constant schedule and gradient clipping; validates on AUROC every epoch
and keeps the weights ``train.select`` names in ``best.pt``: the final epoch's (default), or the
best val AUROC's with early stopping after ``patience`` epochs without improvement. It saves
``last.pt`` every ``checkpoint_every`` steps and at each epoch end, and at the end scores the kept
model on val and test.

Nothing here imports MLflow: metrics go to a :class:`~clinical_moe.tracking.RunLogger`. Under
``torchrun`` every rank runs this loop; only rank 0 logs and writes files.

Testing hook: with ``CLINICAL_MOE_KILL_AFTER_STEP=k`` in the environment the process SIGKILLs
itself right after optimizer step ``k`` (and its checkpoint, if one is due): a deterministic stand-in
for ``kill -9`` used by the resume tests.
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from clinical_moe.config import Config
from clinical_moe.data.dataset import CachedDataset, Collator, present_modalities
from clinical_moe.metrics import best_threshold, classification_metrics, f1, probabilities
from clinical_moe.model import MultimodalModel, create_model, default_encoder_type
from clinical_moe.registry import ENCODERS, HEADS
from clinical_moe.tracking import NullLogger, RunLogger
from clinical_moe.training import distributed as D
from clinical_moe.training.checkpoint import (
    BEST,
    CheckpointDir,
    capture_rng,
    load_checkpoint,
    restore_rng,
    seed_everything,
)
from clinical_moe.training.losses import (
    encoder_target_losses,
    infer_task,
    num_classes_for,
    task_loss,
)
from clinical_moe.training.routing_stats import RoutingStats
from clinical_moe.training.sampling import TrainSampler, modality_dropout

KILL_ENV = "CLINICAL_MOE_KILL_AFTER_STEP"


# ------------------------------------------------------------------------------------------------
# Builders: config -> plain objects


@dataclass
class Data:
    """The three splits of a cache plus what the model needs to know about its labels."""

    train: CachedDataset
    val: CachedDataset
    test: CachedDataset | None
    task: str
    num_classes: int
    encoder_kwargs: dict = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)  # per-event target names
    continuous: dict[str, torch.Tensor] = field(default_factory=dict)  # (K,) bool per modality
    modalities: list[str] = field(default_factory=list)  # of the model: the cache's non-empty ones


def cache_targets(store) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """Per-event target names of a cache by modality, and which are continuous (``(K,)`` bool).

    Read from ``summary["targets"]`` (``{"cxr": [names], ...}``) and the optional
    ``summary["target_kinds"]`` (per modality a ``{name: kind}`` mapping or a list aligned with the
    names, or one flat ``{name: kind}``); a kind other than ``"continuous"`` counts as binary.
    Old caches without targets give ``({}, {})``.
    """
    names = getattr(store, "target_names", None)
    if names is None:
        names = store.summary.get("targets") or {}
    kinds = store.summary.get("target_kinds") or {}
    out, continuous = {}, {}
    for m, ns in names.items():
        ns = list(ns or [])
        if not ns:
            continue
        k = kinds.get(m, kinds)
        if isinstance(k, (list, tuple)) and len(k) == len(ns):
            flags = [kind == "continuous" for kind in k]
        elif isinstance(k, dict):
            flags = [k.get(n) == "continuous" for n in ns]
        else:
            flags = [False] * len(ns)
        out[m], continuous[m] = ns, torch.tensor(flags, dtype=torch.bool)
    return out, continuous


def build_data(cfg: Config, cache_dir: str | Path) -> Data:
    """Open the cache's splits, infer the task from its label columns, read its target names.

    A modality no stay of the cache has (an absent release) is left out, with a warning naming it.
    """
    mods = present_modalities(cache_dir, cfg.data.modalities)
    train = CachedDataset(cache_dir, "train", mods)
    val = CachedDataset(cache_dir, "val", mods)
    has_test = "test" in set(train.store.manifest["split"])
    test = CachedDataset(cache_dir, "test", mods) if has_test else None
    labels = train.store.manifest[train.label_columns].to_numpy(np.float64)
    task = infer_task(train.label_columns, labels)
    summary = train.store.summary.get("encoder_kwargs", {}) or {}
    targets, continuous = cache_targets(train.store)
    n_classes = num_classes_for(task, train.label_columns, labels)
    return Data(train, val, test, task, n_classes, summary, targets, continuous, modalities=mods)


def target_modalities(
    cfg: Config, targets: dict[str, list[str]], modalities: list[str] | None = None
) -> list[str]:
    """Modalities whose encoder gets a per-event target head and auxiliary loss in ``train``.

    Those with a weight > 0 in ``train.encoder_aux``, targets in the cache, an encoder that takes
    ``num_targets``, and a trainable backbone (a frozen backbone cannot learn from the loss).
    """
    out = []
    for m in modalities or cfg.data.modalities:
        spec = cfg.model.encoders.get(m) or {}
        kind = spec.get("type") or default_encoder_type(m)
        takes = "num_targets" in inspect.signature(ENCODERS.get(kind)).parameters
        trainable = not spec.get("freeze")
        if cfg.train.encoder_aux.get(m, 0) > 0 and targets.get(m) and takes and trainable:
            out.append(m)
    return out


def encoder_options(
    cfg: Config,
    cache_kwargs: dict,
    targets: dict | None = None,
    modalities: list[str] | None = None,
) -> dict:
    """``cfg.model.encoders`` + the cache's required encoder options, for the modalities used.

    The cache's options (e.g. the note vocabulary size) describe the data, so they win over the
    config; they apply only to the default encoder type of a modality. With the cache's per-event
    ``targets``, encoders of :func:`target_modalities` get ``num_targets`` (their target head).
    """
    out = {}
    with_targets = target_modalities(cfg, targets or {}, modalities)
    for m in modalities or cfg.data.modalities:
        spec = dict(cfg.model.encoders.get(m) or {})
        if spec.get("type", m) == m:
            spec.update(cache_kwargs.get(m, {}))
        if m in with_targets:
            spec["num_targets"] = len(targets[m])
        if spec:
            out[m] = spec
    return out


def build_model(cfg: Config, data: Data) -> MultimodalModel:
    """``create_model`` from the config's model section (the head gets the task when it asks)."""
    head = dict(cfg.model.head)
    if "task" in inspect.signature(HEADS.get(cfg.model.name)).parameters and "task" not in head:
        head["task"] = data.task
    return create_model(
        cfg.model.name,
        modalities=data.modalities or cfg.data.modalities,
        num_classes=data.num_classes,
        d_model=cfg.model.d_model,
        num_tokens=cfg.model.num_tokens,
        encoders=encoder_options(cfg, data.encoder_kwargs, data.targets, data.modalities),
        **head,
    )


def build_scheduler(opt: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 over ``total`` (or constant)."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (DataLoader base seeds never touch the global RNG)."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    )


# ------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(model: MultimodalModel, loader, device, routing: RoutingStats | None = None):
    """Eval-mode logits of every batch: ``(ids [N], labels [N] or [N, C], logits [N, C])``."""
    model.eval()
    ids, labels, logits = [], [], []
    for batch in loader:
        out = model(batch.to(device))
        if routing is not None:
            routing.update(out.gates)
        ids += batch.ids
        labels.append(batch.labels.cpu())
        logits.append(out.logits.float().cpu())
    if not logits:
        return np.zeros(0, np.int64), torch.zeros(0), torch.zeros(0, 1)
    return np.asarray(ids), torch.cat(labels), torch.cat(logits)


def tuned_f1(
    y: np.ndarray, p: np.ndarray, task: str, prefix: str, threshold: float | None
) -> dict[str, float]:
    """Binary: F1 at a threshold chosen on validation (F1 at 0.5 is ~0 for rare outcomes).

    ``threshold`` None chooses it on ``(y, p)`` themselves (the validation split); the test split
    gets the validation threshold. Keys ``<prefix>_threshold``, ``<prefix>_f1_at_val_threshold``.
    """
    if task != "binary" or len(y) == 0:
        return {}
    thr = float(best_threshold(y, p, task)) if threshold is None else float(threshold)
    return {f"{prefix}_threshold": thr, f"{prefix}_f1_at_val_threshold": f1(y, p, task, thr)}


def epoch_line(epoch: int, epochs: int, m: dict[str, float], improved: bool) -> str:
    """One console line per epoch (1-based), kept on screen: loss parts, val AUROC / AUPRC / F1."""
    parts = [f"task {m.get('train_task_loss', math.nan):.3f}"]
    for key, label in (("train_aux_loss", "aux"), ("train_encoder_aux_loss", "enc")):
        if key in m:
            parts.append(f"{label} {m[key]:.3f}")
    line = (
        f"epoch {epoch}/{epochs}  loss {m.get('train_loss', math.nan):.3f} ({', '.join(parts)})  "
        f"val AUROC {m.get('val_auroc', math.nan):.3f} AUPRC {m.get('val_auprc', math.nan):.3f}"
    )
    if "val_f1_at_val_threshold" in m:
        line += f" F1 {m['val_f1_at_val_threshold']:.3f}@{m['val_threshold']:.2f}"
    line += f" loss {m.get('val_loss', math.nan):.3f}"
    line += f"  {m.get('train_samples_per_s', math.nan):.0f} samples/s"
    return line + ("  * best" if improved else "")


def evaluate(
    model,
    dataset: CachedDataset,
    data: Data,
    cfg: Config,
    info: D.DistInfo,
    routing: bool = False,
    prefix: str = "val",
    threshold: float | None = None,
) -> dict[str, float]:
    """AUROC / AUPRC / F1 / loss of ``dataset``; under DDP each rank scores a slice, then gather.

    F1 is reported at 0.5 (``<prefix>_f1``) and, for binary tasks, at the validation threshold
    (:func:`tuned_f1`; ``threshold`` None chooses it on this split).
    """
    idx = list(range(info.rank, len(dataset), info.world_size))  # no padding: every stay once
    loader = DataLoader(
        Subset(dataset, idx),
        batch_size=cfg.train.batch_size,
        shuffle=False,
        collate_fn=Collator(dataset),
        num_workers=cfg.train.num_workers,
        generator=seeded(cfg.seed, 7),
    )
    stats = RoutingStats(dataset.modalities) if routing else None
    ids, y, logits = predict(model, loader, info.device, stats)
    parts = D.gather_objects((ids, y, logits, stats), info)
    y = torch.cat([p[1] for p in parts])
    logits = torch.cat([p[2] for p in parts])
    probs = probabilities(logits, data.task)
    out = {
        f"{prefix}_{k}": v for k, v in classification_metrics(y.numpy(), probs, data.task).items()
    }
    out.update(tuned_f1(y.numpy(), probs, data.task, prefix, threshold))
    out[f"{prefix}_loss"] = float(task_loss(logits, y, data.task)) if len(y) else math.nan
    if routing:
        merged = RoutingStats(dataset.modalities)
        for p in parts:  # every rank's counts
            merged.merge(p[3])
        out.update(merged.compute())
    return out


# ------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_id: str | None
    best_epoch: int
    metrics: dict[str, float]  # best model on val and test
    checkpoint_dir: Path
    samples_per_s: float
    steps: int


class Trainer:
    """One training run.

    Args:
        cfg: The validated run config.
        cache_dir: A finished preprocessing cache.
        ckpt: Where ``last.pt`` / ``best.pt`` go (rank 0 writes).
        logger: Metrics sink; pass a :class:`~clinical_moe.tracking.NullLogger` on ranks > 0.
        info: Distributed placement (single process by default).
        resume: A checkpoint dict (from ``last.pt``) to continue from, or None.
        quiet: No progress bars.
    """

    def __init__(
        self,
        cfg: Config,
        cache_dir: str | Path,
        ckpt: CheckpointDir,
        logger: RunLogger | None = None,
        info: D.DistInfo | None = None,
        resume: dict | None = None,
        quiet: bool = False,
    ) -> None:
        self.cfg, self.ckpt, self.quiet = cfg, ckpt, quiet
        self.info = info or D.DistInfo()
        self.logger = logger or NullLogger()
        t = cfg.train
        # 1. seeds, data
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        seed_everything(cfg.seed, t.deterministic)
        self.data = build_data(cfg, cache_dir)
        # 2. model (identical init on every rank), optimiser, schedule
        self.model = build_model(cfg, self.data).to(self.info.device)
        self.net = D.wrap_ddp(self.model, self.info)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        # the kept weights' running average (train.ema_decay); buffers follow the live model
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay))
            if t.ema_decay > 0
            else None
        )
        self.sampler = TrainSampler(
            self.data.train.present,
            t.sampler,
            cfg.seed,
            t.warmup_epochs,
            self.info.world_size,
            self.info.rank,
        )
        self.steps_per_epoch = math.ceil(len(self.sampler.order()) / t.batch_size)
        if t.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, t.max_steps_per_epoch)
        self.sched = build_scheduler(
            self.opt, t.scheduler, t.warmup_steps, t.epochs * self.steps_per_epoch
        )
        # 3. per-rank randomness of training (dropout, noisy gates, modality dropout)
        seed_everything(cfg.seed + 1000 * self.info.rank, t.deterministic)
        self.aug = seeded(cfg.seed, self.info.rank, 11)
        # 4. loop state (all of it goes into the checkpoint)
        self.epoch = self.step = self.position = 0
        self.early = {"best": -math.inf, "best_epoch": -1, "bad": 0, "stopped": False}
        self.meters: dict[str, float] = defaultdict(float)
        if resume is not None:
            self.load_state(resume)

    @property
    def kept_model(self) -> MultimodalModel:
        """The weights validation scores and ``best.pt`` keeps: the EMA's when it is on."""
        return self.model if self.ema is None else self.ema.module

    # -- checkpoint state ---------------------------------------------------------------------
    def state(self, kept: bool = False) -> dict:
        """Everything needed to continue exactly where we are (RNG of every rank gathered).

        Args:
            kept: ``model`` holds the kept weights (:attr:`kept_model`, for ``best.pt``) instead
                of the live ones; the two differ only with ``train.ema_decay > 0``.
        """
        rng = D.gather_objects(capture_rng(self.aug), self.info)
        return {
            "model": (self.kept_model if kept else self.model).state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng,
            "world_size": self.info.world_size,
            "epoch": self.epoch,
            "step": self.step,
            "position": self.position,
            "early_stopping": dict(self.early),
            "meters": dict(self.meters),
            "run_id": self.logger.run_id,
            "head": self.cfg.model.name,
            "ehr_scaling": self.data.train.store.ehr_scaling,  # what the weights expect
        }

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if "ema" not in ckpt:
                raise ValueError(
                    "--resume: the checkpoint has no weight average but train.ema_decay > 0; "
                    "resume with the config the run started with"
                )
            self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.epoch, self.step, self.position = ckpt["epoch"], ckpt["step"], ckpt["position"]
        self.early = dict(ckpt["early_stopping"])
        self.meters = defaultdict(float, ckpt["meters"])
        rngs = ckpt["rng"]
        restore_rng(
            rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0], self.aug
        )

    def save(self, name: str = "last.pt") -> None:
        state = self.state(kept=name == BEST)  # collective: every rank calls it
        if self.info.is_main:
            self.ckpt.save(state, name)

    # -- one optimisation step ----------------------------------------------------------------
    def train_step(self, batch) -> None:
        t = self.cfg.train
        batch = batch.to(self.info.device)
        if self.data.task == "multiclass":  # collate gives float labels; heads expect class ids
            batch = replace(batch, labels=batch.labels.long())
        # Modality dropout hides modalities from the head only: the encoders still run on every
        # present modality, so their per-event target losses keep all of the data.
        shown = None
        if t.modality_dropout > 0 or t.single_modality_rate > 0:
            shown = modality_dropout(
                batch.present, t.modality_dropout, self.aug, single=t.single_modality_rate
            )
        self.net.train()
        out, tokens = self.net(batch, return_tokens=True, head_present=shown)
        loss_task = task_loss(out.logits, batch.labels, self.data.task)
        loss_enc, enc_parts = encoder_target_losses(
            tokens, batch, t.encoder_aux, self.data.continuous
        )
        loss = loss_task + out.aux_loss + loss_enc
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        n = len(batch)
        self.meters["n"] += n
        self.meters["train_loss"] += float(loss.detach()) * n
        self.meters["train_task_loss"] += float(loss_task.detach()) * n
        self.meters["train_aux_loss"] += float(out.aux_loss.detach()) * n
        if enc_parts:  # encoder target losses (weighted sum, and each modality's raw loss)
            self.meters["train_encoder_aux_loss"] += float(loss_enc.detach()) * n
        for k, v in {**out.extras, **enc_parts}.items():
            self.meters[f"train_{k}"] += float(torch.as_tensor(v).float().mean()) * n

    # -- epochs -------------------------------------------------------------------------------
    def train_epoch(self) -> float:
        """Train the rest of the current epoch (from ``position``); returns samples per second."""
        t = self.cfg.train
        self.sampler.set_epoch(self.epoch, start=self.position * t.batch_size)
        loader = DataLoader(
            self.data.train,
            batch_size=t.batch_size,
            sampler=self.sampler,
            collate_fn=Collator(self.data.train),
            num_workers=t.num_workers,
            generator=seeded(self.cfg.seed, self.epoch),
        )
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.position,
            disable=self.quiet,
            desc=f"epoch {self.epoch + 1}/{t.epochs}",
            unit="batch",
            leave=False,
        )
        kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        start, seen = time.perf_counter(), 0
        for batch in loader:
            if self.position >= self.steps_per_epoch:
                break
            self.train_step(batch)
            seen += len(batch)
            self.position += 1
            self.step += 1
            bar.update()
            bar.set_postfix(loss=f"{self.meters['train_loss'] / max(1.0, self.meters['n']):.4f}")
            due = t.checkpoint_every and self.step % t.checkpoint_every == 0
            if due and self.position < self.steps_per_epoch:
                self.save()
            if kill_at and self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        return seen * self.info.world_size / max(time.perf_counter() - start, 1e-9)

    def end_epoch(self, samples_per_s: float) -> None:
        """Validate, update early stopping, log the epoch, save ``best.pt`` / ``last.pt``."""
        meters = D.all_reduce_sum(dict(self.meters), self.info)
        n = max(1.0, meters.pop("n", 0.0))
        metrics = {k: v / n for k, v in meters.items()}
        metrics.update(
            evaluate(self.kept_model, self.data.val, self.data, self.cfg, self.info, routing=True)
        )
        metrics["lr"] = self.opt.param_groups[0]["lr"]
        metrics["train_samples_per_s"] = samples_per_s
        auroc = metrics["val_auroc"]
        score = (
            auroc if math.isfinite(auroc) else -metrics["val_loss"]
        )  # one-class val: use the loss
        improved = score > self.early["best"]
        if self.cfg.train.select == "final":  # keep every epoch's weights; never stop early
            if improved:
                self.early["best"] = score  # for the console's "* best" only
            self.early.update(best_epoch=self.epoch, bad=0)
            self.save(BEST)
        elif improved:
            self.early.update(best=score, best_epoch=self.epoch, bad=0)
            self.save(BEST)
        else:
            self.early["bad"] += 1
            self.early["stopped"] = self.early["bad"] >= self.cfg.train.patience
        self.logger.log_metrics(metrics, step=self.epoch + 1)  # MLflow steps = 1-based epochs
        if self.info.is_main:
            print(epoch_line(self.epoch + 1, self.cfg.train.epochs, metrics, improved), flush=True)
        self.epoch, self.position = self.epoch + 1, 0
        self.meters = defaultdict(float)
        self.save()

    def fit(self) -> TrainResult:
        """Train until ``epochs`` or early stopping, then score the best model on val and test."""
        speeds = []
        while self.epoch < self.cfg.train.epochs and not self.early["stopped"]:
            speeds.append(self.train_epoch())
            self.end_epoch(speeds[-1])
        final = self.final_metrics()
        # Logged once: a run resumed after a kill in this final phase does not log them again.
        if self.info.is_main and not self.ckpt.read_run().get("final_logged"):
            self.logger.log_metrics(final, step=self.epoch)
            self.ckpt.write_run({**self.ckpt.read_run(), "final_logged": True})
        return TrainResult(
            self.logger.run_id,
            self.early["best_epoch"],
            final,
            self.ckpt.path,
            float(np.mean(speeds)) if speeds else math.nan,
            self.step,
        )

    def final_metrics(self) -> dict[str, float]:
        """Val and test scores of the best checkpoint (rank 0 reads it and broadcasts)."""
        best = None
        if self.info.is_main and self.ckpt.best.exists():
            best = load_checkpoint(self.ckpt.best)["model"]
        best = D.broadcast_object(best, self.info)
        if best is not None:
            self.model.load_state_dict(best)
        out = {
            f"best_{k}": v
            for k, v in evaluate(self.model, self.data.val, self.data, self.cfg, self.info).items()
        }
        if self.data.test is not None:
            thr = out.get("best_val_threshold")  # chosen on validation, applied unchanged to test
            out.update(
                evaluate(
                    self.model,
                    self.data.test,
                    self.data,
                    self.cfg,
                    self.info,
                    prefix="test",
                    threshold=thr,
                )
            )
        out["best_epoch"] = float(self.early["best_epoch"] + 1)  # 1-based, as on the console
        return out
