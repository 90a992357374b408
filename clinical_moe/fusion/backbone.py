"""Small dense transformer pieces shared by the fusion heads, with an optional group dimension.

Every module here works on inputs with a leading *group* dimension ``G``: ``x (G, N, T, D)``.
Group ``g`` uses its own weights, so ``G`` independent networks (e.g. I2MoE's interaction experts)
run as one batched matmul per layer instead of a Python loop. ``groups=1`` gives an ordinary
module (callers add and remove the leading dimension with ``unsqueeze(0)`` / ``squeeze(0)``).

Each ``forward`` accepts ``groups``: an optional ``LongTensor[G']`` selecting which of the module's
groups to run (default: all, in order), so one group can be run on its own and compared with the
grouped pass.

Attention uses a key mask (True = real token). Padded keys get exactly zero weight. A mask with
every key real is dropped, so the fused (memory-efficient) attention kernel is used. A row with no
real key at all attends uniformly over its (meaningless) keys instead of producing NaN; callers
mask such rows out of their readout.

Speed (issue #16; results unchanged up to float rounding): an input expanded along the groups is
layer-normalised once (only the affine part is per group); a block's two layer norms have their
affine part folded into the following projection (``GroupedLinear(..., norm=)``: no per-group
``(G, N, T, D)`` affine pass and its backward); q, k and v are strided views of the projection
(their gradients meet in one concatenation); the byte-mask dropout's scale is folded into the
residual add (``Dropout.residual``, whose backward is one pass) or into the mask itself
(``byte_scaled_mask``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _pick(p: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    return p if groups is None else p.index_select(0, groups)


class GroupedLinear(nn.Module):
    """``G`` independent linear maps applied to ``x (G, ..., d_in)`` -> ``(G, ..., d_out)``.

    Args:
        num_groups: Number of independent weight sets G.
        d_in: Input width.
        d_out: Output width.
        bias: Whether to add a bias.
    """

    def __init__(self, num_groups: int, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_groups, d_in, d_out))
        self.bias = nn.Parameter(torch.empty(num_groups, d_out)) if bias else None
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init range
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        groups: torch.Tensor | None = None,
        alpha: float = 1.0,
        norm: GroupedLayerNorm | None = None,
    ) -> torch.Tensor:
        """``alpha * x @ W_g + b_g`` (``alpha`` lets a caller fold a scale of ``x`` in).

        With ``norm``, the map applies to ``norm(x)`` (same groups), and the norm's affine
        transform ``y * w + b`` is folded into this map instead of being applied to every token:
        ``LN(x) @ (diag(w) W) + (b W + bias)``, both folded parameters made from the current
        ones at each call (autograd carries their gradients to ``w`` and ``b``). That saves a
        pass over ``x``'s size in the forward and three in the backward. Same result up to
        float rounding.
        """
        w = _pick(self.weight, groups)  # (G, d_in, d_out)
        G, d_in, d_out = w.shape
        b = None if self.bias is None else _pick(self.bias, groups).unsqueeze(1)  # (G, 1, d_out)
        if norm is not None:
            gain = _pick(norm.weight, groups).unsqueeze(-1)  # (G, d_in, 1)
            shift = _pick(norm.bias, groups).unsqueeze(1)  # (G, 1, d_in)
            b = torch.bmm(shift, w) if b is None else torch.baddbmm(b, shift, w)  # (G, 1, d_out)
            w = w * gain  # (G, d_in, d_out): diag(gain) W
            x = norm.normalize(x)  # (G, ..., d_in), no affine
        shape = x.shape
        xr = x.reshape(G, -1, d_in)  # (G, R, d_in); a view for x expanded along G (stride 0)
        if b is None:
            y = torch.bmm(xr, w) if alpha == 1.0 else torch.bmm(xr, w) * alpha  # (G, R, d_out)
        else:
            y = torch.baddbmm(b, xr, w, alpha=alpha)  # (G, R, d_out)
        out = (*shape[:-1], d_out)  # (G, ..., d_out)
        # reshaped as torch.matmul does (_unsafe_view): not an autograd view of y, so that a
        # caller may write into it (Dropout.residual(inplace=True)) without autograd rebasing
        # it, and the gradient of a later in-place result is not a view (accumulates in place)
        return y if y.shape == out else torch.ops.aten._unsafe_view(y, out)


def byte_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout drawing one random byte per element instead of one float.

    ``F.dropout`` on CPU draws a Bernoulli float per element, which costs about three times a
    ``128 x 128`` matmul over the same tensor. Here the random bits come as 64-bit integers, eight
    bytes per draw: element i is dropped when its byte is below ``round(256 p)``, so the drop
    rate is ``p`` rounded to a multiple of 1/256 (0.1 -> 0.1016) and kept values are scaled by
    ``256 / (256 - round(256 p))``. The mask is applied as a 0/1 float multiply (cheaper than a
    boolean ``where`` on CPU).

    Args:
        x: Any tensor.
        p: Drop probability in [0, 1].
    """
    keep = byte_scaled_mask(x.shape, p, x.device, x.dtype)
    return x if keep is None else x * keep  # one pass forward and backward


def byte_dropout_unscaled(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """:func:`byte_dropout` without the final scaling: ``(x with dropped elements zeroed,
    scale)``, so that a caller can fold ``scale`` into its next operation (the ``alpha`` of a
    residual add or of a matmul) instead of a separate pass over ``x``. Same random draws."""
    keep, scale = byte_keep_mask(x.shape, p, x.device, x.dtype)
    return (x, 1.0) if keep is None else (x * keep, scale)


def byte_keep_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | None, float]:
    """The random draw of :func:`byte_dropout_unscaled` on its own: ``(keep, scale)`` with
    ``keep`` a 0/1 tensor of ``shape`` and ``dtype`` (None when ``p`` rounds to 0) and ``scale``
    the factor for the kept values. A float mask, because multiplying by it costs a fraction of
    a boolean ``where`` / ``masked_fill`` on CPU; it is made from the random bytes ``b`` as
    ``clamp(b - (thr - 1), 0, 1)`` (1 exactly when ``b >= thr``), no boolean comparison."""
    thr = round(p * 256)
    if thr <= 0:
        return None, 1.0
    if thr >= 256:
        return torch.zeros(shape, dtype=dtype, device=device), 1.0
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=device)
    keep = words.view(torch.uint8)[:n].view(shape).to(dtype).sub_(thr - 1).clamp_(0.0, 1.0)
    return keep, 256.0 / (256 - thr)


def byte_scaled_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """:func:`byte_keep_mask` with the scale applied to the mask: ``0`` or ``scale`` per element
    (None when nothing is dropped). Multiplying by it drops and scales in one pass, and the
    product's backward is one pass too. Same random draws as :func:`byte_keep_mask`."""
    keep, scale = byte_keep_mask(shape, p, device, dtype)
    return keep if keep is None or scale == 1.0 else keep.mul_(scale)


class _MaskedResidual(torch.autograd.Function):
    """``h + scale * x * keep`` (``keep`` a 0/1 mask of ``x``'s shape, ``h`` broadcastable to it).

    The same forward as ``torch.addcmul(h, x, keep, value=scale)``, whose backward makes ``x``'s
    gradient in two passes (``grad * keep``, then ``* scale``), each a fresh tensor of ``x``'s
    size; here it is one ``addcmul`` onto a zero scalar. With ``inplace`` the sum is written
    into ``x`` (marked dirty: autograd refuses the backward if anything saved ``x``), which
    spares a fresh tensor of ``x``'s size, whose first touch costs more than the add itself.
    """

    @staticmethod
    def forward(ctx, h, x, keep, scale, inplace):
        ctx.save_for_backward(keep)
        ctx.scale, ctx.h_shape = scale, h.shape
        if not inplace:
            return torch.addcmul(h, x, keep, value=scale)
        ctx.mark_dirty(x)
        return torch.addcmul(h, x, keep, value=scale, out=x)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        gh = gx = None
        if ctx.needs_input_grad[0]:
            gh = grad if grad.shape == ctx.h_shape else grad.sum_to_size(ctx.h_shape)
        if ctx.needs_input_grad[1]:
            gx = torch.addcmul(grad.new_zeros(()), grad, keep, value=ctx.scale)  # one pass
        return gh, gx, None, None, None


class Dropout(nn.Module):
    """:func:`byte_dropout` as a module (identity in eval mode); a drop-in for ``nn.Dropout``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return byte_dropout(x, self.p) if self.training else x

    def unscaled(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(dropped x before scaling, scale)`` (:func:`byte_dropout_unscaled`; ``(x, 1)`` in
        eval mode)."""
        return byte_dropout_unscaled(x, self.p) if self.training else (x, 1.0)

    def residual(self, h: torch.Tensor, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``h + self(x)`` with the dropout scale folded into the add (one pass fewer), and a
        backward that makes ``x``'s gradient in one pass (:class:`_MaskedResidual`).

        ``inplace``: write the sum into ``x`` (a fresh, non-view tensor that nothing saved for
        its backward, e.g. a matmul's output; autograd refuses the backward otherwise).
        """
        keep, scale = byte_keep_mask(x.shape, self.p, x.device, x.dtype)
        if keep is None or not self.training:
            return x.add_(h) if inplace else h + x
        return _MaskedResidual.apply(h, x, keep, scale, inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GroupedLayerNorm(nn.Module):
    """LayerNorm over the last dimension with a separate affine transform per group."""

    def __init__(self, num_groups: int, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_groups, d_model))
        self.bias = nn.Parameter(torch.zeros(num_groups, d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """``x (G, ..., D)`` -> ``(G, ..., D)``; an ``x`` expanded along G (the same tokens for
        every group, stride 0) is normalised once and only the affine transform is per group.
        (A :class:`GroupedLinear` given ``norm=`` folds the affine part into its weights.)"""
        G, D = x.shape[0], x.shape[-1]
        view = (G,) + (1,) * (x.dim() - 2) + (D,)
        w, b = (
            _pick(self.weight, groups).view(view),
            _pick(self.bias, groups).view(view),
        )  # (G, 1.., D)
        return torch.addcmul(b, self.normalize(x), w)  # (G, ..., D)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The normalisation without the affine transform, ``(G, ..., D)``; an ``x`` expanded
        along G (stride 0) is normalised once and returned expanded the same way."""
        D = x.shape[-1]
        if x.shape[0] > 1 and x.stride(0) == 0:
            return F.layer_norm(x[:1], (D,), eps=self.eps).expand(x.shape)  # (G, ..., D)
        return F.layer_norm(x, (D,), eps=self.eps)  # (G, ..., D)


class _GatherSplit(torch.autograd.Function):
    """:func:`gather_split` with a backward that adds each part's gradient straight into its
    columns of one zero ``(G, R, k*C)`` tensor (``index_add_``), instead of concatenating the
    parts' gradients first (a fresh tensor of ``k`` times a part's size) as
    ``index_select(...).split(...)`` would."""

    @staticmethod
    def forward(ctx, t, index, k):
        ctx.save_for_backward(index)
        ctx.shape, ctx.k = t.shape, k
        return t.index_select(1, index).chunk(k, -1)  # k x (G, n, C), views of one gather

    @staticmethod
    def backward(ctx, *grads):
        (index,) = ctx.saved_tensors
        out = grads[0].new_zeros(ctx.shape)  # (G, R, k*C)
        for p, g in zip(out.chunk(ctx.k, -1), grads):
            if g is not None:
                p.index_add_(1, index, g)
        return out, None, None


def gather_split(t: torch.Tensor, index: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, ...]:
    """Rows ``index (n,)`` of ``t (G, R, k*C)`` along dim 1, split along the last dimension into
    ``k`` contiguous ``(G, n, C)`` tensors (e.g. q, k and v of gathered positions); the same
    values and gradients as ``t.index_select(1, index).split(C, -1)``."""
    return _GatherSplit.apply(t, index, k)


def safe_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask (..., T)`` with rows that have no real key turned all-True (avoids NaN softmax)."""
    return mask | ~mask.any(dim=-1, keepdim=True)


class GroupedSelfAttention(nn.Module):
    """Multi-head self-attention (no residual, no norm) over ``x (G, N, T, D)``.

    Args:
        num_groups: Independent weight sets G.
        d_model: Width D.
        num_heads: Heads (must divide D).
        dropout: Attention-probability dropout (training only).
    """

    def __init__(self, num_groups: int, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = GroupedLinear(num_groups, d_model, 3 * d_model)
        self.proj = GroupedLinear(num_groups, d_model, d_model)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: ``(G, N, T, D)``.
            key_mask: ``BoolTensor`` broadcastable to ``(G, N, T)``, True = real key; None = all.
            groups: Optional group selection (see module docstring).
        """
        return self.attend(self.qkv(x, groups), key_mask, groups)

    def attend(
        self,
        qkv: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention from precomputed projections ``qkv (G, N, T, 3D)`` (``self.qkv`` of the
        input), or the three ``(G, N, T, D)`` parts of it (e.g. :func:`gather_split`), so that
        rows sharing tokens can reuse them; same result as :meth:`forward`."""
        # q, k, v as strided views (split along the features, not permute + unbind): their
        # gradients then meet in one concatenation instead of a stack plus a permuted copy
        parts = qkv.chunk(3, -1) if isinstance(qkv, torch.Tensor) else qkv
        G, N, T, D = parts[0].shape
        H = self.num_heads
        q, k, v = (t.reshape(G * N, T, H, D // H).transpose(1, 2) for t in parts)  # (G*N, H, T, dh)
        attn_mask = None
        if key_mask is not None and not bool(key_mask.all()):  # all real: the unmasked kernel
            km = safe_key_mask(key_mask.expand(G, N, T)).reshape(G * N, 1, 1, T)  # (G*N, 1, 1, T)
            attn_mask = km
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        o = o.transpose(1, 2).reshape(G, N, T, D)  # (G, N, T, D)
        return self.proj(o, groups)


class GroupedFFN(nn.Module):
    """Two-layer GELU MLP ``D -> hidden -> D`` per group (no residual, no norm)."""

    def __init__(self, num_groups: int, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = GroupedLinear(num_groups, d_model, hidden)
        self.fc2 = GroupedLinear(num_groups, hidden, d_model)
        self.drop = Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        groups: torch.Tensor | None = None,
        norm: GroupedLayerNorm | None = None,
    ) -> torch.Tensor:
        """``FFN(x)``, or ``FFN(norm(x))`` with the norm's affine folded into fc1."""
        a = F.gelu(self.fc1(x, groups, norm=norm))  # (G, ..., hidden)
        # the dropout as one multiply by a pre-scaled mask (byte_scaled_mask; an ``alpha`` on
        # fc2 would cost its backward an extra pass), in place: gelu's backward reads its input
        mask = byte_scaled_mask(a.shape, self.drop.p, a.device, a.dtype) if self.training else None
        return self.fc2(a if mask is None else a.mul_(mask), groups)


class GroupedBlock(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))`` then ``x + FFN(LN(x))``, per group.

    Args:
        num_groups: Independent weight sets G.
        d_model: Width D.
        num_heads: Attention heads.
        hidden: FFN width.
        dropout: Dropout inside the FFN and on both residual branches.
        attn_dropout: Dropout on attention probabilities (None = ``dropout``). Any value > 0
            makes CPU attention take the unfused path that materialises every ``T x T``
            probability matrix (and a random mask of the same size) for backward.
    """

    def __init__(
        self,
        num_groups: int,
        d_model: int,
        num_heads: int,
        hidden: int,
        dropout: float = 0.0,
        attn_dropout: float | None = None,
    ) -> None:
        super().__init__()
        attn_dropout = dropout if attn_dropout is None else attn_dropout
        self.norm1 = GroupedLayerNorm(num_groups, d_model)
        self.attn = GroupedSelfAttention(num_groups, d_model, num_heads, attn_dropout)
        self.norm2 = GroupedLayerNorm(num_groups, d_model)
        self.ffn = GroupedFFN(num_groups, d_model, hidden, dropout)
        self.drop = Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (G, N, T, D)``, ``key_mask`` broadcastable to ``(G, N, T)`` -> ``(G, N, T, D)``."""
        return self.forward_qkv(x, self.project(x, groups), key_mask, groups)

    def project(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """The attention projections ``(G, N, T, 3D)`` of ``x``: per token, so reusable by rows
        holding the same token (e.g. I2MoE's perturbed variants)."""
        return self.attn.qkv(x, groups, norm=self.norm1)  # the norm's affine folded in

    def forward_qkv(
        self,
        x: torch.Tensor,
        qkv: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` given ``qkv = self.project(x)`` (or rows / positions gathered from it,
        whole or as its three parts: :meth:`GroupedSelfAttention.attend`)."""
        # both residual adds write into the branch outputs (fresh matmul results) instead of
        # new tensors
        x = self.drop.residual(x, self.attn.attend(qkv, key_mask, groups), inplace=True)
        return self.drop.residual(x, self.ffn(x, groups, norm=self.norm2), inplace=True)
