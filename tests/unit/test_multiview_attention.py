"""Multi-view / cross-domain attention processors: equal to diffusers' default when off, and
each switch lets exactly the intended images see each other."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from genlab.nn.multiview_attention import (
    MultiViewAttnProcessor,
    attention_groups,
    install_multiview_attention,
    multiview_layer_plan,
)

B, D, N, L, C = 2, 2, 3, 5, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=C, heads=2, dim_head=8).eval()


def run(attn: Attention, processor, x: torch.Tensor) -> torch.Tensor:
    attn.set_processor(processor)
    with torch.no_grad():
        return attn(x)


def images(x: torch.Tensor) -> torch.Tensor:
    """(B*D*N, L, C) -> (B, D, N, L, C)."""
    return x.view(B, D, N, *x.shape[1:])


def masked_reference(attn: Attention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Joint attention over all B*D*N*L tokens, masked to the allowed image pairs."""
    t = x.shape[0]
    flat = x.reshape(1, t * L, C)
    token_mask = allowed.repeat_interleave(L, 0).repeat_interleave(L, 1)  # (tL, tL)

    class Masked:
        def __call__(
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
        ):
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            h = attn.heads
            q, k, v = (a.view(1, -1, h, a.shape[-1] // h).transpose(1, 2) for a in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
            out = out.transpose(1, 2).reshape(1, -1, C)
            return attn.to_out[1](attn.to_out[0](out))

    return run(attn, Masked(), flat).view(t, L, C)


def test_all_switches_off_equals_diffusers_default(attn: Attention) -> None:
    x = torch.randn(B * D * N, L, C)
    expected = run(attn, AttnProcessor2_0(), x)
    for proc in (
        MultiViewAttnProcessor(N, D, multiview=False, cross_domain=False),
        MultiViewAttnProcessor(1, 1, multiview=True, cross_domain=True),  # nothing to group
    ):
        torch.testing.assert_close(run(attn, proc, x), expected, rtol=1e-5, atol=1e-6)
    # 4-D (B, C, H, W) input, as diffusers' attention blocks may pass it
    x4 = torch.randn(B * D * N, C, 2, 3)
    torch.testing.assert_close(
        run(attn, MultiViewAttnProcessor(N, D, False, False), x4),
        run(attn, AttnProcessor2_0(), x4),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("multiview", "cross_domain"), [(True, False), (False, True), (True, True), (False, False)]
)
def test_grouped_attention_matches_masked_joint_attention(
    attn: Attention, multiview: bool, cross_domain: bool
) -> None:
    x = torch.randn(B * D * N, L, C)
    out = run(attn, MultiViewAttnProcessor(N, D, multiview, cross_domain), x)
    allowed = attention_groups(B, D, N, multiview, cross_domain)
    torch.testing.assert_close(out, masked_reference(attn, x, allowed), rtol=1e-4, atol=1e-5)


def perturbation_effect(attn: Attention, proc, b: int, d: int, n: int) -> torch.Tensor:
    """(B, D, N) bool: which images' outputs change when image (b, d, n)'s input changes."""
    x = torch.randn(B * D * N, L, C)
    y = x.clone()
    images(y)[b, d, n] += torch.randn(L, C)
    diff = (images(run(attn, proc, x)) - images(run(attn, proc, y))).abs().amax(dim=(-1, -2))
    return diff > 1e-6


def test_multiview_lets_views_of_one_object_and_domain_see_each_other(attn: Attention) -> None:
    changed = perturbation_effect(attn, MultiViewAttnProcessor(N, D, True, False), 1, 0, 2)
    expected = torch.zeros(B, D, N, dtype=torch.bool)
    expected[1, 0, :] = True  # every view of object 1, RGB; not the normals, not object 0
    assert torch.equal(changed, expected)
    off = perturbation_effect(attn, MultiViewAttnProcessor(N, D, False, False), 1, 0, 2)
    only_self = torch.zeros(B, D, N, dtype=torch.bool)
    only_self[1, 0, 2] = True
    assert torch.equal(off, only_self)


def test_cross_domain_links_matching_rgb_and_normal_views(attn: Attention) -> None:
    # perturb normal view 1 of object 0: RGB view 1 of object 0 changes, RGB view 0 does not
    changed = perturbation_effect(attn, MultiViewAttnProcessor(N, D, False, True), 0, 1, 1)
    expected = torch.zeros(B, D, N, dtype=torch.bool)
    expected[0, :, 1] = True
    assert torch.equal(changed, expected)
    both = perturbation_effect(attn, MultiViewAttnProcessor(N, D, True, True), 0, 1, 1)
    expected_both = torch.zeros(B, D, N, dtype=torch.bool)
    expected_both[0, 1, :] = True  # all normal views (multi-view)
    expected_both[0, 0, 1] = True  # and the matching RGB view (cross-domain)
    assert torch.equal(both, expected_both)


def test_bad_batches_and_cross_attention_are_refused(attn: Attention) -> None:
    proc = MultiViewAttnProcessor(N, D, True, False)
    with pytest.raises(ValueError, match="not a multiple of num_domains x num_views"):
        run(attn, proc, torch.randn(D * N + 1, L, C))
    attn.set_processor(proc)
    with pytest.raises(ValueError, match="install it on attn1 only"):
        attn(torch.randn(D * N, L, C), encoder_hidden_states=torch.randn(D * N, 1, C))
    with pytest.raises(ValueError, match="num_views must be a positive integer"):
        MultiViewAttnProcessor(0)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    from genlab.models.mv_diffusion.networks import TINY_UNET

    torch.manual_seed(0)
    return UNet2DConditionModel(**{**TINY_UNET, "in_channels": 4}).eval()


def test_install_places_processors_by_layer() -> None:
    unet = tiny_unet()
    attn2_before = {k: v for k, v in unet.attn_processors.items() if "attn2" in k}
    install_multiview_attention(unet, N, mvcd_attention=True, cd_attention_mid=True)
    procs = unet.attn_processors
    for name, proc in procs.items():
        if "attn2" in name:
            assert proc is attn2_before[name]
            continue
        assert isinstance(proc, MultiViewAttnProcessor) and proc.multiview
        assert proc.cross_domain == name.startswith("mid_block.")
    plan = multiview_layer_plan(unet, False, False, True)
    assert {k for k, (_, cd) in plan.items() if cd} == {
        k for k in plan if k.startswith(f"up_blocks.{len(unet.up_blocks) - 1}.")
    }
    assert all(not mv for mv, _ in plan.values())


def test_unet_with_switches_off_equals_default_and_mixing_follows_switches() -> None:
    unet = tiny_unet()
    x = torch.randn(B * D * N, 4, 8, 8)
    t = torch.full((B * D * N,), 10)
    ctx = torch.randn(B * D * N, 1, 32)

    def forward(u, inputs):
        with torch.no_grad():
            return u(inputs, t, encoder_hidden_states=ctx).sample

    reference = forward(unet, x)
    install_multiview_attention(unet, N, mvcd_attention=False)
    torch.testing.assert_close(forward(unet, x), reference, rtol=1e-5, atol=1e-5)

    y = x.clone()
    y[0] += 1.0  # object 0, RGB, view 0
    for switches, affected in (
        ({"mvcd_attention": False}, {0}),
        ({"mvcd_attention": True}, {0, 1, 2}),  # RGB views of object 0
        ({"mvcd_attention": False, "cd_attention_mid": True}, {0, N}),  # + normal view 0
    ):
        install_multiview_attention(unet, N, **switches)
        diff = (forward(unet, x) - forward(unet, y)).abs().amax(dim=(1, 2, 3))
        assert {i for i in range(B * D * N) if diff[i] > 1e-6} == affected, switches
