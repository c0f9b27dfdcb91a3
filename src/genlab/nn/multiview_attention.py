"""Self-attention across the views and domains of one object, as diffusers attention processors.

Multi-view diffusion runs one 2-D UNet over every image of an object at once. The UNet batch
holds ``B`` objects x ``D`` domains (RGB, normals, ...) x ``N`` views, flattened in that order
(the view index changes fastest)::

    index = (b * D + d) * N + n

A self-attention layer (``attn1`` of a transformer block) then sees hidden states of shape
``(B * D * N, L, C)`` (``L`` tokens per image). :class:`MultiViewAttnProcessor` widens the set
of keys/values each query token attends to, without adding weights (the layer's own
``to_q/to_k/to_v/to_out`` are used, so pretrained image weights load unchanged):

==========================  =====================================================  ============
switches                    a token of image ``(b, d, n)`` attends to              tokens
==========================  =====================================================  ============
neither                     its own image ``(b, d, n)``: plain self-attention       ``L``
``multiview``               all ``N`` views of its object in its domain ``(b, d)``  ``N * L``
``cross_domain``            view ``n`` of its object in every domain ``(b, :, n)``  ``D * L``
both                        all views of ``(b, d)`` plus view ``n`` of the other    ``(N+D-1) L``
                            domains
==========================  =====================================================  ============

Multi-view attention is reshaping ``(B*D*N, L, C) -> (B*D, N*L, C)``; cross-domain attention
is ``(B, D, N, L, C) -> (B*N, D*L, C)``; both together gather, per image, the keys of its
domain's views and of its matching views in the other domains. All variants run
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels where
the device has them). With both switches off the processor computes exactly what diffusers'
``AttnProcessor2_0`` computes.

:func:`install_multiview_attention` puts the processors on a ``UNet2DConditionModel``'s
self-attention layers: multi-view attention on every ``attn1`` (``mvcd_attention``), and
cross-domain attention on the ``attn1`` layers of the mid block (``cd_attention_mid``) and of
the last up block, the decoder's highest-resolution block right before the output
(``cd_attention_last``). Cross-attention layers (``attn2``) keep their processor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "MultiViewAttnProcessor",
    "attention_groups",
    "install_multiview_attention",
    "multiview_layer_plan",
]


@dataclass(frozen=True)
class MultiViewAttnProcessor:
    """Self-attention over the views (``multiview``) and/or domains (``cross_domain``) of an object.

    Args:
        num_views: views ``N`` per object and domain.
        num_domains: domains ``D`` per object (2: RGB and normals).
        multiview: a token attends to every view of its object in its own domain.
        cross_domain: a token attends to the same view of its object in every domain.

    The layer's batch must be a multiple of ``D * N``, ordered ``(object, domain, view)``
    (see the module docstring). Attention masks are refused when either switch is on.
    Classifier-free guidance that doubles the batch (``[uncond, cond]``) keeps that order.
    """

    num_views: int
    num_domains: int = 2
    multiview: bool = True
    cross_domain: bool = False

    def __post_init__(self) -> None:
        for name in ("num_views", "num_domains"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def grouped(self) -> bool:
        """True when tokens attend beyond their own image."""
        return (self.multiview and self.num_views > 1) or (
            self.cross_domain and self.num_domains > 1
        )

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        grouped = self.grouped
        if grouped:
            if encoder_hidden_states is not None:
                raise ValueError(
                    "MultiViewAttnProcessor groups self-attention; it was called with "
                    "encoder_hidden_states (a cross-attention layer): install it on attn1 only"
                )
            if attention_mask is not None:
                raise ValueError("MultiViewAttnProcessor does not support attention masks")
            group = self.num_domains * self.num_views
            if batch % group:
                raise ValueError(
                    f"attention batch {batch} is not a multiple of num_domains x num_views = "
                    f"{self.num_domains} x {self.num_views}: the UNet batch must hold whole "
                    "objects ordered (object, domain, view)"
                )
        if attention_mask is not None:
            kv_len = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (batch, tokens, heads, head_dim)
        query = query.view(batch, -1, heads, head_dim)
        key = key.view(batch, -1, heads, head_dim)
        value = value.view(batch, -1, heads, head_dim)
        # q/k norms act on the last (head_dim) axis, as in diffusers' processors
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if grouped:
            out = self._grouped_attention(query, key, value, attn.scale)
        else:
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2),
                key.transpose(1, 2),
                value.transpose(1, 2),
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                scale=attn.scale,
            ).transpose(1, 2)
        hidden_states = out.reshape(batch, tokens, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _grouped_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``(T, L, h, e)`` tensors with ``T = B * D * N`` -> attention output ``(T, L, h, e)``."""
        total, length, heads, dim = query.shape
        d, n = self.num_domains, self.num_views
        b = total // (d * n)
        multiview = self.multiview and n > 1
        cross_domain = self.cross_domain and d > 1

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # (G, tokens, h, e) -> SDPA over (G, h, tokens, e) -> (G, tokens, h, e)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
            )
            return out.transpose(1, 2)

        if multiview and not cross_domain:
            # (B*D*N, L) -> (B*D, N*L): one attention over all views of a domain
            grouped = [x.reshape(b * d, n * length, heads, dim) for x in (query, key, value)]
            return sdpa(*grouped).reshape(total, length, heads, dim)
        if cross_domain and not multiview:
            # (B, D, N, L) -> (B, N, D, L) -> (B*N, D*L): one attention over the domains of a view
            def to_groups(x: torch.Tensor) -> torch.Tensor:
                x = x.reshape(b, d, n, length, heads, dim).transpose(1, 2)
                return x.reshape(b * n, d * length, heads, dim)

            out = sdpa(*(to_groups(x) for x in (query, key, value)))
            out = out.reshape(b, n, d, length, heads, dim).transpose(1, 2)
            return out.reshape(total, length, heads, dim)
        # both: image (b, d, n) attends to the N views of (b, d) and view n of the other domains
        return sdpa(query, self._gather(key, b), self._gather(value, b))

    def _gather(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Keys or values ``(T, L, h, e)`` -> per image ``(T, (N + D - 1) * L, h, e)``."""
        d, n = self.num_domains, self.num_views
        _, length, heads, dim = x.shape
        x = x.reshape(b, d, n, length, heads, dim)
        same_domain = x.reshape(b, d, 1, n * length, heads, dim).expand(b, d, n, -1, -1, -1)
        others = torch.tensor(
            [[o for o in range(d) if o != k] for k in range(d)], device=x.device
        )  # (D, D-1)
        other_domains = x[:, others]  # (B, D, D-1, N, L, h, e)
        other_domains = other_domains.permute(0, 1, 3, 2, 4, 5, 6).reshape(
            b, d, n, (d - 1) * length, heads, dim
        )
        gathered = torch.cat([same_domain, other_domains], dim=3)
        return gathered.reshape(b * d * n, (n + d - 1) * length, heads, dim)


def attention_groups(
    num_objects: int,
    num_domains: int,
    num_views: int,
    multiview: bool,
    cross_domain: bool,
) -> torch.Tensor:
    """Which images attend to which: ``(T, T)`` bool, ``T = B * D * N`` (reference for tests).

    Entry ``[i, j]`` is True when the tokens of image ``i`` attend to those of image ``j``
    under :class:`MultiViewAttnProcessor` with the given switches.
    """
    idx = torch.arange(num_objects * num_domains * num_views)
    obj = idx // (num_domains * num_views)
    dom = (idx // num_views) % num_domains
    view = idx % num_views
    same_obj = obj[:, None] == obj[None, :]
    same_dom = dom[:, None] == dom[None, :]
    same_view = view[:, None] == view[None, :]
    allowed = same_obj & same_dom & same_view
    if multiview:
        allowed |= same_obj & same_dom
    if cross_domain:
        allowed |= same_obj & same_view
    return allowed


def _last_up_block_prefix(unet: Any) -> str | None:
    up_blocks = getattr(unet, "up_blocks", None)
    return f"up_blocks.{len(up_blocks) - 1}." if up_blocks else None


def multiview_layer_plan(
    unet: Any,
    mvcd_attention: bool = True,
    cd_attention_mid: bool = False,
    cd_attention_last: bool = False,
) -> dict[str, tuple[bool, bool]]:
    """``{attn1 processor name: (multiview, cross_domain)}`` for every self-attention layer."""
    last = _last_up_block_prefix(unet)
    plan: dict[str, tuple[bool, bool]] = {}
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            continue
        cross_domain = (cd_attention_mid and name.startswith("mid_block.")) or (
            cd_attention_last and last is not None and name.startswith(last)
        )
        plan[name] = (bool(mvcd_attention), bool(cross_domain))
    return plan


def install_multiview_attention(
    unet: Any,
    num_views: int,
    mvcd_attention: bool = True,
    cd_attention_mid: bool = False,
    cd_attention_last: bool = False,
    num_domains: int = 2,
) -> dict[str, Any]:
    """Set multi-view / cross-domain processors on the self-attention layers of ``unet``.

    ``unet`` is a diffusers ``UNet2DConditionModel`` (anything with ``attn_processors``,
    ``set_attn_processor`` and, for ``cd_attention_last``, ``up_blocks``). Every ``attn1``
    layer gets a :class:`MultiViewAttnProcessor` with ``multiview=mvcd_attention`` and
    ``cross_domain`` on in the mid block (``cd_attention_mid``) and in the last up block
    (``cd_attention_last``); with both switches off for a layer, the processor is plain SDPA
    self-attention. Cross-attention (``attn2``) processors are left as they are. Returns the
    processors by layer name and logs a one-line summary.
    """
    plan = multiview_layer_plan(unet, mvcd_attention, cd_attention_mid, cd_attention_last)
    if not plan:
        raise ValueError(f"{type(unet).__name__} has no self-attention (attn1) layers")
    if (cd_attention_mid or cd_attention_last) and not any(cd for _, cd in plan.values()):
        raise ValueError(
            "cross-domain attention was asked for, but the UNet has no self-attention layer in "
            f"{'its mid block' if cd_attention_mid else ''}"
            f"{' or ' if cd_attention_mid and cd_attention_last else ''}"
            f"{'its last up block' if cd_attention_last else ''}"
        )
    shared: dict[tuple[bool, bool], MultiViewAttnProcessor] = {}
    processors: dict[str, Any] = dict(unet.attn_processors)
    for name, switches in plan.items():
        if switches not in shared:
            shared[switches] = MultiViewAttnProcessor(num_views, num_domains, *switches)
        processors[name] = shared[switches]
    unet.set_attn_processor(dict(processors))
    counts = summarize(plan)
    log.info(
        "multi-view attention on %d self-attention layers: %s (num_views=%d, num_domains=%d)",
        len(plan),
        ", ".join(f"{v} {k}" for k, v in counts.items() if v),
        num_views,
        num_domains,
    )
    return processors


def summarize(plan: Mapping[str, tuple[bool, bool]]) -> dict[str, int]:
    """Layer counts per kind: ``{"multi-view": .., "cross-domain": .., "multi-view+cross-domain": .., "plain": ..}``."""
    counts = {"multi-view": 0, "cross-domain": 0, "multi-view+cross-domain": 0, "plain": 0}
    for multiview, cross_domain in plan.values():
        key = (
            "multi-view+cross-domain"
            if multiview and cross_domain
            else "multi-view"
            if multiview
            else "cross-domain"
            if cross_domain
            else "plain"
        )
        counts[key] += 1
    return counts
