"""Report D's Vision Transformer from scratch: patch embedding, multi-head self-attention, GELU MLP,
pre-norm residual blocks with LayerNorm, a class token and learned position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cxr.errors import CxrError
from cxr.models import register_model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # The fused kernel (flash attention on CUDA) instead of softmax(q k^T) v spelled out.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, image_size: int, patch_size: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        if image_size % patch_size or dim % heads:
            raise CxrError(f"arch 'vit': image_size {image_size} must be a multiple of patch_size {patch_size} "
                           f"and dim {dim} of heads {heads}")
        self.patch = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


@register_model()
def vit(*, num_classes: int, in_chans: int, image_size: int, patch_size: int = 16, dim: int = 192, depth: int = 6,
        heads: int = 3, mlp_ratio: float = 4.0, dropout: float = 0.1) -> nn.Module:
    """A small ViT (ViT-Tiny width by default) for training from scratch."""
    return ViT(num_classes, in_chans, image_size, patch_size, dim, depth, heads, mlp_ratio, dropout)
