"""Clinical notes encoder: N tokenised notes per stay -> exactly T tokens.

Each real note is encoded on its own (``backbone="small"``: token + position embeddings and a small
pre-LN transformer encoder with a key padding mask, Vaswani et al. 2017; ``backbone="hf"``: a frozen
Hugging Face encoder loaded from a local directory, e.g. a clinical BERT, never downloaded). Notes
longer than one chunk are split into chunks encoded separately. Then (METHODS.md, "Encoders"):

- ``token_mode="tokens"`` (default): every real token of every real note, tagged with its note's
  time embedding, is pooled to T tokens by learned-query attention (:class:`TokenResampler`);
- ``token_mode="event"`` (FuseMoE, Han et al. 2024): one embedding per note (masked mean of its
  tokens), then multi-time attention over note times (Shukla & Marlin 2021; :mod:`.mtand`).

``input_ids`` must come from the tokenizer matching the backbone (the notes loader's vocabulary
for ``small``; the model's own tokenizer for ``hf``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clinical_moe.encoders.base import ModalityEncoder
from clinical_moe.encoders.events import random_events, real_events, scatter_events
from clinical_moe.encoders.mtand import EventMTAND, TimeEmbedding
from clinical_moe.encoders.resample import TokenResampler
from clinical_moe.registry import ENCODERS
from clinical_moe.types import ModalityInputs, ModalityTokens

HF_HINT = 'backbone="hf" needs the optional dependency transformers: pip install "clinical-moe[hf]"'


def encode_chunked(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    attn: torch.Tensor,
    chunk: int,
    width: int,
) -> torch.Tensor:
    """Run ``fn(ids, attn) -> (r, chunk, width)`` on the non-empty ``chunk``-long pieces of notes.

    Args:
        ids: ``(n, L)`` token ids; attn: ``(n, L)`` bool, True = real token.

    Returns:
        ``(n, L, width)``; zeros at positions of chunks with no real token.
    """
    n, L = ids.shape
    c = math.ceil(L / chunk)
    pad = c * chunk - L
    ids = nn.functional.pad(ids, (0, pad)).view(n * c, chunk)  # (n * c, chunk)
    attn = nn.functional.pad(attn, (0, pad), value=False).view(n * c, chunk)  # (n * c, chunk)
    real = attn.any(-1).nonzero().flatten()  # (r,)
    hidden = fn(ids.index_select(0, real), attn.index_select(0, real))  # (r, chunk, W)
    out = hidden.new_zeros(n * c, chunk, width).index_copy(0, real, hidden)  # (n * c, chunk, W)
    return out.view(n, c * chunk, width)[:, :L]  # (n, L, W)


def load_hf_encoder(path: str | Path | None) -> nn.Module:
    """A Hugging Face encoder from a local directory only (``local_files_only=True``)."""
    if not path:
        raise ValueError('backbone="hf" needs hf_path: a local directory with the model files')
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"hf_path {path} does not exist; models are never downloaded - save one locally first"
        )
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(HF_HINT) from exc
    return transformers.AutoModel.from_pretrained(str(path), local_files_only=True)


@ENCODERS.register("notes")
class NotesEncoder(ModalityEncoder):
    """``input_ids/attention_mask (B, N, L)``, ``times``, ``event_mask (B, N)`` -> T tokens.

    Args:
        d_model: Token width D.
        num_tokens: Output tokens T.
        backbone: ``"small"`` (trainable transformer) or ``"hf"`` (frozen local HF model).
        token_mode: ``"tokens"`` (resample all real tokens) or ``"event"`` (mTAND over notes).
        vocab_size: Vocabulary of the small backbone (ids must be < vocab_size).
        num_layers: Transformer layers of the small backbone.
        num_heads: Attention heads of the small backbone (must divide D).
        max_len: Chunk length of the small backbone (its position table size).
        dropout: Dropout of the small backbone.
        hf_path: Local directory of the HF model (``backbone="hf"``).
        chunk_len: Chunk length for the HF model (at most its maximum positions).
        window_hours: Window of the reference times / note time embeddings.
        mtand_heads: mTAND heads (event mode).
        time_embed_dim: Size of the time embeddings.
        note_length: L drawn by :meth:`random_inputs`.
        num_events: Notes N drawn by :meth:`random_inputs`.
    """

    padding = {"input_ids": "attention_mask", "attention_mask": "event_mask", "times": "event_mask"}
    backbone_prefixes = ("embed.", "pos", "encoder.", "hf.")

    def __init__(
        self,
        d_model: int = 32,
        num_tokens: int = 4,
        backbone: str = "small",
        token_mode: str = "tokens",
        vocab_size: int = 5000,
        num_layers: int = 1,
        num_heads: int = 4,
        max_len: int = 128,
        dropout: float = 0.1,
        hf_path: str | None = None,
        chunk_len: int = 512,
        window_hours: float = 48.0,
        mtand_heads: int = 1,
        time_embed_dim: int = 16,
        note_length: int = 16,
        num_events: int = 2,
    ) -> None:
        super().__init__(d_model, num_tokens)
        if backbone not in ("small", "hf"):
            raise ValueError(f"unknown notes backbone {backbone!r}; use 'small' or 'hf'")
        if token_mode not in ("tokens", "event"):
            raise ValueError(f"unknown notes token_mode {token_mode!r}; use 'tokens' or 'event'")
        self.backbone_name, self.token_mode = backbone, token_mode
        self.vocab_size, self.window_hours = vocab_size, float(window_hours)
        self.note_length, self.num_events = note_length, num_events
        if backbone == "small":
            if d_model % num_heads:
                raise ValueError(f"notes num_heads={num_heads} must divide d_model={d_model}")
            self.chunk = max_len
            self.embed = nn.Embedding(vocab_size, d_model)
            self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(
                d_model,
                num_heads,
                2 * d_model,
                dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(
                layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
            )
            width = d_model
        else:
            self.hf = load_hf_encoder(hf_path)
            for p in self.hf.parameters():
                p.requires_grad_(False)
            self.hf.eval()
            width = int(self.hf.config.hidden_size)
            self.vocab_size = int(getattr(self.hf.config, "vocab_size", vocab_size))
            self.chunk = min(
                chunk_len, int(getattr(self.hf.config, "max_position_embeddings", chunk_len))
            )
        self.width = width
        self.proj = nn.Sequential(nn.Linear(width, d_model), nn.LayerNorm(d_model))
        if token_mode == "tokens":
            self.time = TimeEmbedding(time_embed_dim, scale=window_hours)
            self.time_proj = nn.Linear(time_embed_dim, d_model)
            self.resample = TokenResampler(d_model, num_tokens)
        else:
            self.mtand = EventMTAND(d_model, num_tokens, window_hours, mtand_heads, time_embed_dim)

    def train(self, mode: bool = True) -> NotesEncoder:
        super().train(mode)
        if hasattr(self, "hf"):
            self.hf.eval()  # the HF backbone is frozen: no dropout
        return self

    def _small(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """One chunk per row: ``(r, chunk)`` -> ``(r, chunk, D)``."""
        if bool((ids >= self.vocab_size).any()) or bool((ids < 0).any()):
            raise ValueError(f"notes input_ids must lie in [0, vocab_size={self.vocab_size})")
        h = self.embed(ids) + self.pos[: ids.shape[1]]  # (r, chunk, D)
        return self.encoder(h, src_key_padding_mask=~attn)  # (r, chunk, D)

    def _hf(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """One chunk per row through the frozen HF model: ``(r, chunk)`` -> ``(r, chunk, W)``."""
        with torch.no_grad():
            out = self.hf(input_ids=ids, attention_mask=attn.long())
        return out.last_hidden_state  # (r, chunk, W)

    def forward(self, inputs: ModalityInputs) -> ModalityTokens:
        ids, attn = inputs["input_ids"].long(), inputs["attention_mask"].bool()
        event_mask = inputs["event_mask"].bool()
        B, N, L = ids.shape
        attn = attn & event_mask[..., None]  # (B, N, L)
        note_mask = event_mask & attn.any(-1)  # (B, N) real, non-empty notes
        ids = torch.where(attn, ids, torch.zeros_like(ids))  # (B, N, L)
        times = torch.where(note_mask, inputs["times"].float(), 0.0)  # (B, N)
        fn = self._small if self.backbone_name == "small" else self._hf
        r_attn = real_events(attn, note_mask)  # (n, L)
        hidden = encode_chunked(fn, real_events(ids, note_mask), r_attn, self.chunk, self.width)
        hidden = self.proj(hidden)  # (n, L, D)
        if self.token_mode == "event":
            w = r_attn.unsqueeze(-1).to(hidden.dtype)  # (n, L, 1)
            notes = (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)  # (n, D)
            tokens, token_times = self.mtand(scatter_events(notes, note_mask), times, note_mask)
        else:
            tagged = scatter_events(hidden, note_mask)  # (B, N, L, D)
            tagged = tagged + self.time_proj(self.time(times)).unsqueeze(2)  # (B, N, L, D)
            flat = tagged.reshape(B, N * L, self.d_model)  # (B, N * L, D)
            tokens = self.resample(flat, attn.reshape(B, N * L))  # (B, T, D)
            token_times = None
        mask = torch.ones(B, self.num_tokens, dtype=torch.bool, device=tokens.device)
        return ModalityTokens(tokens, mask, token_times)

    def random_inputs(self, batch_size: int, generator: torch.Generator) -> ModalityInputs:
        B, N, L = batch_size, self.num_events, self.note_length
        event_mask, times = random_events(B, N, self.window_hours, generator)
        lengths = torch.randint(1, L + 1, (B, N), generator=generator)
        attn = torch.arange(L)[None, None, :] < lengths[..., None]  # (B, N, L)
        attn = attn & event_mask[..., None]  # (B, N, L)
        ids = torch.randint(1, self.vocab_size, (B, N, L), generator=generator) * attn
        return {"input_ids": ids, "attention_mask": attn, "times": times, "event_mask": event_mask}
