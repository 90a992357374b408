"""Shared machinery of the event encoders (CXR images, ECGs): N events per stay -> exactly T tokens.

An event encoder runs its backbone on the *real* events only (``event_mask`` True), so padded
events never reach it, then turns the per-event feature maps into T tokens in one of two ways:

- ``token_mode="spatial"`` (CXR) / ``"time"`` (ECG): each event's feature map is adaptively
  average-pooled to T cells (a near-square grid for images, T segments for signals), projected to
  D, tagged with the event's time embedding, and averaged over the row's real events, cell by cell.
- ``token_mode="event"`` (FuseMoE, Han et al. 2024): one embedding per event (global average of its
  feature map), then multi-time attention (mTAND, Shukla & Marlin 2021) over the events at their
  times -> T tokens at reference times evenly spaced over the window.

With ``num_targets = K > 0`` the encoder also predicts K modality-native targets per event (e.g.
CheXpert findings per image, machine ECG statements per recording) from the event's pooled
backbone feature, before any token projection: ``ModalityTokens.event_logits (B, N, K)``. Only the
training losses read these logits (heads never do), so the backbone learns its modality from labels
richer than the task's; the head is one linear layer on a vector the encoder computes anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from clinical_moe.encoders.base import ModalityEncoder
from clinical_moe.encoders.mtand import EventMTAND, TimeEmbedding
from clinical_moe.types import ModalityInputs, ModalityTokens


def scatter_events(values: torch.Tensor, event_mask: torch.Tensor) -> torch.Tensor:
    """Place per-real-event ``values (n, ...)`` back at their ``(B, N)`` slots; zeros elsewhere."""
    B, N = event_mask.shape
    idx = event_mask.reshape(-1).nonzero().flatten()  # (n,)
    out = values.new_zeros(B * N, *values.shape[1:])  # (B * N, ...)
    out = out.index_copy(0, idx, values)
    return out.view(B, N, *values.shape[1:])  # (B, N, ...)


def real_events(x: torch.Tensor, event_mask: torch.Tensor) -> torch.Tensor:
    """The real events of ``x (B, N, ...)`` stacked as ``(n, ...)`` (row-major order)."""
    idx = event_mask.reshape(-1).nonzero().flatten()  # (n,)
    return x.reshape(-1, *x.shape[2:]).index_select(0, idx)  # (n, ...)


def random_events(
    batch_size: int, num_events: int, window_hours: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``event_mask (B, N)`` (first event real), sorted ``times (B, N)`` (0 at padding)."""
    mask = torch.rand(batch_size, num_events, generator=generator) < 0.6
    mask[:, 0] = True
    times = (
        torch.rand(batch_size, num_events, generator=generator).sort(dim=1).values * window_hours
    )
    return mask, times * mask


class EventPool(nn.Module):
    """Per-event tokens ``(B, N, T, D)`` -> ``(B, T, D)``: time-tagged masked mean over real events.

    Args:
        d_model: Token width D.
        time_embed_dim: Size of the event-time embedding ``phi(t)``.
        window_hours: Time scale of the embedding.
    """

    def __init__(self, d_model: int, time_embed_dim: int = 16, window_hours: float = 48.0):
        super().__init__()
        self.time = TimeEmbedding(time_embed_dim, scale=window_hours)
        self.time_proj = nn.Linear(time_embed_dim, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, times: torch.Tensor, event_mask: torch.Tensor):
        times = torch.where(event_mask, times, torch.zeros_like(times))
        tagged = tokens + self.time_proj(self.time(times)).unsqueeze(2)  # (B, N, T, D)
        w = event_mask.to(tokens.dtype)[:, :, None, None]  # (B, N, 1, 1)
        pooled = (tagged * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, T, D)
        return self.norm(pooled)


class EventTargetHead(nn.Module):
    """Per-event target logits: pooled backbone feature of each real event ``(n, C)`` -> ``(B, N, K)``.

    Args:
        feature_dim: Size C of the pooled per-event feature.
        num_targets: K targets per event.
    """

    def __init__(self, feature_dim: int, num_targets: int) -> None:
        super().__init__()
        self.linear = nn.Linear(feature_dim, num_targets)

    def forward(self, pooled: torch.Tensor, event_mask: torch.Tensor) -> torch.Tensor:
        return scatter_events(self.linear(pooled), event_mask)  # (B, N, K); 0 at padded slots


POOLS = ("avg", "avgmax")


def pooled_feature(fmap: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """Global pooling of a feature map ``(n, C, *spatial)`` -> ``(n, C)`` or ``(n, 2C)``.

    ``avg`` is the global average; ``avgmax`` concatenates the global maximum to it, so that a
    small, local finding (a 1-pixel line of a support device on a 64-pixel radiograph) is not
    diluted by the whole image's area. Vectors pass through.
    """
    if fmap.dim() == 2:
        return fmap
    flat = fmap.flatten(2)  # (n, C, S)
    if pool == "avgmax":
        return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)  # (n, 2C)
    return flat.mean(-1)  # (n, C)


def grid_shape(num_cells: int) -> tuple[int, int]:
    """The most square ``(rows, cols)`` with ``rows * cols == num_cells`` (e.g. 49 -> 7 x 7)."""
    rows = int(num_cells**0.5)
    while num_cells % rows:
        rows -= 1
    return rows, num_cells // rows


class EventMapEncoder(ModalityEncoder):
    """Base of encoders whose backbone maps one event to a feature map ``(C, *spatial)``.

    Subclasses set ``input_key`` and implement :meth:`features`; ``feature_dim`` is C.

    Args:
        d_model: Token width D.
        num_tokens: Output tokens T.
        feature_dim: Channels C of the backbone's feature map (or size F of a vector feature).
        token_mode: ``"spatial"``/``"time"`` (pooled cells, averaged over events) or ``"event"``
            (one embedding per event + mTAND over event times).
        window_hours: Window of the reference times / time embeddings.
        num_heads: mTAND heads (event mode).
        time_embed_dim: Size of the time embeddings.
        vector_features: The backbone gives one vector ``(n, C)`` per event, not a map (e.g.
            precomputed embeddings); cell tokens are then a learned expansion ``C -> T x D``.
        num_targets: K per-event target logits from the pooled backbone feature (0: none).
        pool: ``"avg"`` (average pooling of the map, to cells and globally) or ``"avgmax"``
            (average and maximum concatenated, 2C features: keeps small local findings).
    """

    input_key = "image"
    cell_modes: tuple[str, ...] = ("spatial",)

    def __init__(
        self,
        d_model: int,
        num_tokens: int,
        feature_dim: int,
        token_mode: str,
        window_hours: float,
        num_heads: int,
        time_embed_dim: int,
        vector_features: bool = False,
        num_targets: int = 0,
        pool: str = "avg",
    ) -> None:
        super().__init__(d_model, num_tokens)
        if num_targets < 0:
            raise ValueError(f"num_targets must be >= 0, got {num_targets}")
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; use one of {POOLS}")
        self.pool_mode = "avg" if vector_features else pool
        if self.pool_mode == "avgmax":
            feature_dim = 2 * feature_dim  # (average, maximum) of each channel
        self.num_targets = int(num_targets)
        self.target_head = EventTargetHead(feature_dim, num_targets) if num_targets else None
        modes = (*self.cell_modes, "event")
        if token_mode not in modes:
            raise ValueError(f"unknown token_mode {token_mode!r}; use one of {modes}")
        self.token_mode = token_mode
        self.window_hours = float(window_hours)
        self.vector_features = vector_features
        if token_mode == "event":
            self.event_proj = nn.Sequential(nn.Linear(feature_dim, d_model), nn.LayerNorm(d_model))
            self.mtand = EventMTAND(d_model, num_tokens, window_hours, num_heads, time_embed_dim)
        else:
            width = num_tokens * d_model if vector_features else d_model
            self.cell_proj = nn.Linear(feature_dim, width)
            self.cell_pos = nn.Parameter(torch.randn(num_tokens, d_model) * 0.02)
            self.pool = EventPool(d_model, time_embed_dim, window_hours)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.adapt_pool(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def adapt_pool(self, state_dict, prefix: str = "") -> None:
        """Take the pooling that weights in ``state_dict`` were written with.

        Checkpoints and pretrained files written before ``avgmax`` existed have C-wide
        projections; an ``avgmax`` encoder switches to ``avg`` (rebuilding those layers) so that
        they load and behave exactly as they were trained.
        """
        if self.pool_mode != "avgmax":
            return
        for name in ("cell_proj.weight", "event_proj.0.weight", "target_head.linear.weight"):
            w = state_dict.get(prefix + name)
            try:
                module = self.get_submodule(name.rsplit(".", 1)[0]) if w is not None else None
            except AttributeError:
                module = None
            if module is not None and w.shape[1] * 2 == module.in_features:
                self._set_pool("avg", int(w.shape[1]))
                return

    def _set_pool(self, pool: str, feature_dim: int) -> None:
        """Rebuild the layers that read pooled features for ``pool`` and ``feature_dim`` inputs."""
        self.pool_mode = pool
        if self.target_head is not None:
            self.target_head = EventTargetHead(feature_dim, self.num_targets)
        if self.token_mode == "event":
            d = self.event_proj[0].out_features
            self.event_proj = nn.Sequential(nn.Linear(feature_dim, d), nn.LayerNorm(d))
        else:
            self.cell_proj = nn.Linear(feature_dim, self.cell_proj.out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Backbone on real events ``x (n, ...)`` -> ``(n, C, *spatial)`` (or ``(n, C)``)."""
        raise NotImplementedError

    def cells(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map ``(n, C, *spatial)`` -> ``(n, T, C)`` (``(n, T, 2C)`` with ``avgmax``)."""
        n, C = fmap.shape[:2]
        F = nn.functional
        if fmap.dim() == 4:
            grid = grid_shape(self.num_tokens)
            cells = F.adaptive_avg_pool2d(fmap, grid)
            if self.pool_mode == "avgmax":
                cells = torch.cat([cells, F.adaptive_max_pool2d(fmap, grid)], dim=1)
        else:
            cells = F.adaptive_avg_pool1d(fmap, self.num_tokens)
            if self.pool_mode == "avgmax":
                cells = torch.cat([cells, F.adaptive_max_pool1d(fmap, self.num_tokens)], dim=1)
        return cells.reshape(n, -1, self.num_tokens).transpose(1, 2)  # (n, T, C or 2C)

    def event_target_logits(self, inputs: ModalityInputs) -> torch.Tensor:
        """Only the per-event target logits ``(B, N, K)``: backbone + target head, no tokens.

        What ``clinical-moe pretrain`` trains; equal to ``forward(inputs).event_logits``.
        """
        if self.target_head is None:
            raise ValueError(f"{type(self).__name__} was built without targets (num_targets=0)")
        event_mask = inputs["event_mask"].bool()
        fmap = self.features(real_events(inputs[self.input_key], event_mask))  # (n, C, ...)
        return self.target_head(pooled_feature(fmap, self.pool_mode), event_mask)  # (B, N, K)

    def forward(self, inputs: ModalityInputs) -> ModalityTokens:
        key = self.input_key
        if key not in inputs:
            raise KeyError(
                f"{type(self).__name__} expects input {key!r}; got {sorted(inputs)}"
                + (" (use backbone='precomputed' for embeddings)" if "embedding" in inputs else "")
            )
        x, event_mask = inputs[key], inputs["event_mask"].bool()
        times = inputs["times"].to(x.dtype if x.is_floating_point() else torch.float32)
        B = event_mask.shape[0]
        fmap = self.features(real_events(x, event_mask))  # (n, C, *spatial) or (n, C)
        event_logits = None
        if self.target_head is not None:
            event_logits = self.target_head(pooled_feature(fmap, self.pool_mode), event_mask)
        if self.token_mode == "event":
            emb = pooled_feature(fmap, self.pool_mode)  # (n, C) or (n, 2C)
            events = scatter_events(self.event_proj(emb), event_mask)  # (B, N, D)
            tokens, token_times = self.mtand(events, times, event_mask)  # (B, T, D), (B, T)
        else:
            if self.vector_features:
                cells = self.cell_proj(fmap).view(-1, self.num_tokens, self.d_model)  # (n, T, D)
            else:
                cells = self.cell_proj(self.cells(fmap))  # (n, T, D)
            per_event = scatter_events(cells + self.cell_pos, event_mask)  # (B, N, T, D)
            tokens = self.pool(per_event, times, event_mask)  # (B, T, D)
            token_times = None
        mask = torch.ones(B, self.num_tokens, dtype=torch.bool, device=tokens.device)
        return ModalityTokens(tokens, mask, token_times, event_logits)
