"""Chest X-ray encoder: N images per stay (or precomputed image embeddings) -> exactly T tokens.

Backbones are MONAI networks (METHODS.md, "Encoders"): ``densenet121`` is MONAI's 2D DenseNet-121
(Huang et al., CVPR 2017), the usual CXR backbone (e.g. MedFuse), for real use; ``small`` is a
few MONAI residual units with GroupNorm for CPU configs and tests; ``precomputed`` skips the CNN
and reads a user's own features per image. Tokens are either spatial cells of the feature map
(the DenseNet's 7 x 7 map of a 224 x 224 image gives 49 tokens at T = 49) or one embedding per
image followed by FuseMoE's multi-time attention over image times (see :mod:`.events`).
"""

from __future__ import annotations

import torch
from torch import nn

from clinical_moe.encoders.events import EventMapEncoder, random_events
from clinical_moe.registry import ENCODERS
from clinical_moe.types import ModalityInputs

BACKBONES = ("small", "densenet121", "precomputed")


def _monai():
    """Import MONAI where it is used, with an install hint if it is missing."""
    try:
        import monai.networks
    except ImportError as exc:  # pragma: no cover - monai is a core dependency
        raise ImportError('the cxr encoder needs MONAI: pip install "monai>=1.3"') from exc
    return monai.networks


def _small_cnn(channels: tuple[int, ...]) -> nn.Module:
    """A MONAI residual CNN: a strided stem + one strided residual unit per further width."""
    Convolution, ResidualUnit = _monai().blocks.Convolution, _monai().blocks.ResidualUnit

    def norm(c: int) -> tuple:
        return ("group", {"num_groups": 4 if c % 4 == 0 else 1})

    layers: list[nn.Module] = [
        Convolution(2, 1, channels[0], strides=2, kernel_size=5, act="GELU", norm=norm(channels[0]))
    ]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers.append(ResidualUnit(2, c_in, c_out, strides=2, act="GELU", norm=norm(c_out)))
    return nn.Sequential(*layers)


def _densenet121() -> nn.Module:
    """MONAI's DenseNet-121 feature extractor (1 input channel) + the final ReLU; 1024 channels."""
    net = _monai().nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=1)
    return nn.Sequential(net.features, nn.ReLU())  # classifier layers dropped (unused)


@ENCODERS.register("cxr")
class CXREncoder(EventMapEncoder):
    """``image (B, N, 1, H, W)`` or ``embedding (B, N, F)``, ``times``, ``event_mask`` -> T tokens.

    Args:
        d_model: Token width D.
        num_tokens: Output tokens T (spatial mode: a near-square grid of T cells per image).
        backbone: ``"small"`` (default, CPU), ``"densenet121"`` or ``"precomputed"``.
        token_mode: ``"spatial"`` (pooled feature-map cells, averaged over the stay's images with
            their time embedding) or ``"event"`` (one embedding per image + mTAND over times).
        channels: Widths of the small backbone (each stage halves the resolution).
        embedding_dim: Feature size F of precomputed embeddings (``backbone="precomputed"``).
        window_hours: Window of the event reference times / time embeddings.
        num_heads: mTAND heads (event mode).
        time_embed_dim: Size of the time embeddings.
        image_size: Side of the images drawn by :meth:`random_inputs`.
        num_events: Events N drawn by :meth:`random_inputs`.
        num_targets: K per-event target logits from the pooled backbone feature
            (``ModalityTokens.event_logits``; 0: no target head).
        pool: ``"avgmax"`` (default): average and maximum pooling concatenated, so a thin device
            line, a few pixels of a 64-pixel image, is not averaged away (pretrained at 20k
            patients, Support Devices AUROC 0.64 -> 0.99); ``"avg"``: average only (weights
            written with it load into a default encoder, which then pools as they were trained).

    In eval mode every backbone is deterministic and per-sample independent (the small backbone
    uses GroupNorm; DenseNet's BatchNorm uses running statistics in eval).
    """

    padding = {"image": "event_mask", "embedding": "event_mask", "times": "event_mask"}

    def __init__(
        self,
        d_model: int = 32,
        num_tokens: int = 4,
        backbone: str = "small",
        token_mode: str = "spatial",
        channels: tuple[int, ...] = (8, 16, 32),
        embedding_dim: int = 64,
        window_hours: float = 48.0,
        num_heads: int = 1,
        time_embed_dim: int = 16,
        image_size: int = 32,
        num_events: int = 2,
        num_targets: int = 0,
        pool: str = "avgmax",
    ) -> None:
        if backbone not in BACKBONES:
            raise ValueError(f"unknown cxr backbone {backbone!r}; use one of {BACKBONES}")
        channels = tuple(channels)
        feature_dim = {"small": channels[-1], "densenet121": 1024, "precomputed": embedding_dim}
        super().__init__(
            d_model,
            num_tokens,
            feature_dim[backbone],
            token_mode,
            window_hours,
            num_heads,
            time_embed_dim,
            vector_features=backbone == "precomputed",
            num_targets=num_targets,
            pool=pool,
        )
        self.backbone_name = backbone
        self.input_key = "embedding" if backbone == "precomputed" else "image"
        self.embedding_dim = embedding_dim
        self.image_size = image_size
        self.num_events = num_events
        if backbone == "small":
            self.backbone = _small_cnn(channels)
        elif backbone == "densenet121":
            self.backbone = _densenet121()
        else:
            self.backbone = nn.LayerNorm(embedding_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Real images ``(n, 1, H, W)`` -> ``(n, C, h, w)``; embeddings ``(n, F)`` -> ``(n, F)``."""
        if self.backbone_name == "precomputed":
            if x.shape[-1] != self.embedding_dim:
                raise ValueError(
                    f"cxr embeddings have size {x.shape[-1]}, "
                    f"expected embedding_dim={self.embedding_dim}"
                )
            return self.backbone(x)  # (n, F)
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(
                f"cxr images must be (B, N, 1, H, W); got events of shape {tuple(x.shape)}"
            )
        return self.backbone((x - 0.5) / 0.25)  # (n, C, h, w)

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> ModalityInputs:
        event_mask, times = random_events(batch_size, self.num_events, self.window_hours, generator)
        out: ModalityInputs = {"times": times, "event_mask": event_mask}
        if self.backbone_name == "precomputed":
            emb = torch.randn(batch_size, self.num_events, self.embedding_dim, generator=generator)
            out["embedding"] = emb * event_mask[..., None]  # (B, N, F)
        else:
            s = self.image_size
            img = torch.rand(batch_size, self.num_events, 1, s, s, generator=generator)
            out["image"] = img * event_mask[:, :, None, None, None]  # (B, N, 1, H, W)
        return out
