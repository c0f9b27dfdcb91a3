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


#: a T5 encoder small enough for tests and CPU runs (random weights; byte-level vocabulary)
TINY_T5_CONFIG: dict = {
    "vocab_size": 384,  # ByT5: 3 special tokens + 256 bytes + 125 extra ids
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "relative_attention_num_buckets": 8,
}


class T5TextEncoder(TextEncoder):
    """T5 (or mT5) encoder: per-token hidden states + attention mask, and a masked-mean pooled vector.

    ``pretrained``: a hub id (``google/t5-v1_1-base``, ``google/mt5-base``) or a local folder,
    loaded with ``transformers.T5EncoderModel`` and its tokenizer; None builds a
    ``T5EncoderModel`` from ``config`` (default :data:`TINY_T5_CONFIG`) with seeded random
    weights and the byte-level ``ByT5Tokenizer``, which needs no vocabulary file and
    round-trips any UTF-8 text (Turkish included) exactly. Frozen unless ``trainable`` (or
    :meth:`set_trainable` later, for staged unfreezing); ``forward(prompts) -> (B, embed_dim)``
    gives zero vectors for empty prompts, like every :class:`TextEncoder`.
    """

    def __init__(
        self,
        pretrained: str | None = "google/t5-v1_1-base",
        config: dict | None = None,
        embed_dim: int | None = None,
        max_length: int = 128,
        seed: int = 0,
        trainable: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from transformers import T5Config, T5EncoderModel

        if pretrained:
            from transformers import AutoTokenizer

            from genlab.pretrained import from_pretrained_or_explain

            key, offline = "model.text_encoder.pretrained", "model=otuken3d_tiny"
            self.model = from_pretrained_or_explain(
                T5EncoderModel, pretrained, key, offline, what="T5 encoder"
            )
            self.tokenizer = from_pretrained_or_explain(
                AutoTokenizer, pretrained, key, offline, what="T5 tokenizer"
            )
        else:
            from transformers import ByT5Tokenizer

            t5_config = T5Config(**{**TINY_T5_CONFIG, **dict(config or {})})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = T5EncoderModel(t5_config)
            self.tokenizer = ByT5Tokenizer()
        d_model = int(self.model.config.d_model)
        if embed_dim is not None and int(embed_dim) != d_model:
            raise ValueError(
                f"T5 encoder '{pretrained or 'tiny'}' gives {d_model}-dim states, "
                f"config says embed_dim={embed_dim}"
            )
        self.embed_dim = d_model
        self.max_length = max_length
        self.gradient_checkpointing = gradient_checkpointing
        self.set_trainable(trainable)

    def set_trainable(self, trainable: bool) -> None:
        """Freeze (no gradients, eval mode) or unfreeze the whole encoder."""
        self.trainable = bool(trainable)
        self.model.requires_grad_(self.trainable)
        if self.trainable and self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if not self.trainable:
            nn.Module.train(self, False)

    def train(self, mode: bool = True) -> T5TextEncoder:  # noqa: D102 - frozen: always eval
        return nn.Module.train(self, mode and getattr(self, "trainable", False))

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``(B, L)`` on the encoder's device (padded, truncated)."""
        enc = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def decode(self, input_ids: torch.Tensor) -> list[str]:
        """Token ids back to text (special tokens and padding dropped)."""
        return self.tokenizer.batch_decode(input_ids.tolist(), skip_special_tokens=True)

    def encode_tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token hidden states ``(B, L, embed_dim)`` and the attention mask ``(B, L)``."""
        tokens = self.tokenize(prompts)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self.model(**tokens).last_hidden_state
        return hidden, tokens["attention_mask"]

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        hidden, mask = self.encode_tokens(prompts)
        weights = mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            prompts = list(prompts)
            keep = [i for i, p in enumerate(prompts) if p and p.strip()]
            out = torch.zeros(len(prompts), self.embed_dim, device=self.device)
            if keep:
                out = out.index_put(
                    (torch.tensor(keep, device=self.device),),
                    self.encode([prompts[i] for i in keep]).to(out.dtype),
                )
            return out
