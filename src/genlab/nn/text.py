"""Text encoders that turn prompts into condition vectors. All are frozen; empty prompt -> zero vector."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from genlab.pretrained import local_path, weights_unavailable


def _clip_tokenizer():
    """CLIP's own BPE tokenizer, shipped inside open_clip (no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class TextEncoder(nn.Module):
    """Base class: ``forward(prompts) -> (B, embed_dim)`` on the module's device, never trained."""

    embed_dim: int

    def train(self, mode: bool = True) -> TextEncoder:  # noqa: D102 - frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        buffers = list(self.buffers()) + list(self.parameters())
        return buffers[0].device if buffers else torch.device("cpu")

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        out = torch.zeros(len(prompts), self.embed_dim, device=self.device)
        keep = [i for i, p in enumerate(prompts) if p and p.strip()]
        if keep:
            out[keep] = self.encode([prompts[i] for i in keep]).to(out.dtype)
        return out


class HashedBagOfWordsEncoder(TextEncoder):
    """Offline encoder: CLIP BPE tokens hashed into a fixed, seeded random table, mean-pooled, unit norm.

    Needs no weights file (the table is rebuilt from ``seed``), so prompts that share words get
    similar embeddings; it is the default for CPU runs and tests.
    """

    def __init__(self, embed_dim: int = 512, num_buckets: int = 8192, seed: int = 0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_buckets = num_buckets
        self.tokenizer = _clip_tokenizer()
        gen = torch.Generator().manual_seed(seed)
        table = torch.randn(num_buckets, embed_dim, generator=gen) / embed_dim**0.5
        self.register_buffer("table", table, persistent=False)

    def _buckets(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.int64)
        return (ids * 2654435761) % self.num_buckets

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt.lower())
            vec = self.table[self._buckets(ids).to(self.table.device)].mean(0)
            rows.append(vec / vec.norm().clamp_min(1e-8))
        return torch.stack(rows)


class ClipTextEncoder(TextEncoder):
    """open_clip CLIP text tower (ViT-B-32 by default), frozen, unit-norm embeddings.

    ``pretrained`` is an open_clip tag (downloaded through the hub cache) or a local checkpoint
    file; None builds random weights (for shape tests only: the conditioning is then meaningless).
    """

    def __init__(
        self, model_name: str = "ViT-B-32", pretrained: str | None = None, embed_dim: int = 512
    ) -> None:
        super().__init__()
        import open_clip

        try:
            model = open_clip.create_model(
                model_name,
                pretrained=str(local_path(pretrained) or pretrained) if pretrained else None,
            )
        except Exception as err:  # noqa: BLE001 - any download/IO failure gets the same clear message
            raise weights_unavailable(
                f"open_clip {model_name}",
                str(pretrained),
                "model.text_encoder.pretrained",
                err,
                "model/text_encoder=hashed_bow",
            ) from err
        if model.text_projection is not None and model.text_projection.shape[-1] != embed_dim:
            raise ValueError(
                f"{model_name} gives {model.text_projection.shape[-1]}-dim text embeddings, config says embed_dim={embed_dim}"
            )
        model.visual = None  # text tower only
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.embed_dim = embed_dim

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        feats = self.model.encode_text(tokens)
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-8)
