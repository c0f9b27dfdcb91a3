"""Shap-E components and latent decoding on the tiny random-weight model (no downloads)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from genlab.models.shape_e.components import (
    LatentShapeError,
    ShapEComponents,
    pretrained_components,
    tiny_components,
)
from genlab.models.shape_e.decode import (
    EmptySurfaceWarning,
    decode_meshes,
    grid_points,
    query_fields,
    render_views,
    write_turntable_gif,
)
from genlab.pretrained import WeightsUnavailableError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ShapEComponents:
    return tiny_components("text", seed=0)


@pytest.fixture(scope="module")
def sphere_latent(tiny: ShapEComponents) -> tuple[torch.Tensor, list[float]]:
    """A latent fitted for 150 Adam steps to the SDF of a sphere of radius 0.5 (+ loss curve)."""
    radius = 0.5
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, *tiny.latent_shape, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([latent], lr=0.1)
    losses = []
    for _ in range(150):
        uniform = torch.rand(1, 1024, 3, generator=gen) * 2 - 1
        direction = torch.randn(1, 1024, 3, generator=gen)
        shell = radius + 0.1 * torch.randn(1, 1024, 1, generator=gen)
        near = direction / direction.norm(dim=-1, keepdim=True) * shell
        points = torch.cat([uniform, near], dim=1)
        target = torch.tanh(4 * (radius - points.norm(dim=-1)))  # positive inside
        loss = ((query_fields(tiny.renderer, latent, points)["sdf"] - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return latent.detach(), losses


def test_tiny_components_shapes(tiny: ShapEComponents) -> None:
    assert tiny.latent_shape == (64, 32)
    assert tiny.conditioning == "text"
    assert sum(v for v, _ in tiny.renderer.config.param_shapes) == 64
    assert tiny.renderer.config.d_latent == 32
    sched = tiny.scheduler.config
    assert (sched.beta_schedule, sched.num_train_timesteps, sched.prediction_type) == (
        "exp",
        1024,
        "sample",
    )
    assert sched.use_karras_sigmas and sched.clip_sample
    assert tiny.prior.config.clip_embed_dim == 64
    assert tiny.prior.config.embedding_proj_dim == tiny.text_encoder.config.projection_dim
    assert len(tiny.tokenizer) == 49408
    # the prior predicts (mean, variance) per latent entry: 2 * embedding_dim wide
    latents = torch.zeros(2, 64, 32)
    text = torch.zeros(2, tiny.text_encoder.config.projection_dim)
    with torch.no_grad():
        out = tiny.prior(latents, timestep=3, proj_embedding=text).predicted_image_embedding
    assert out.shape == (2, 64, 64)


def test_tiny_image_components() -> None:
    image = tiny_components("image", seed=0)
    assert image.conditioning == "image" and image.text_encoder is None
    pixels = image.image_processor(
        np.zeros((40, 50, 3), dtype=np.uint8), return_tensors="pt"
    ).pixel_values
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        tokens = image.image_encoder(pixels)["last_hidden_state"][:, 1:]
        out = image.prior(
            torch.zeros(1, *image.latent_shape), timestep=1, proj_embedding=tokens
        ).predicted_image_embedding
    assert tokens.shape == (1, 16, 32)
    assert out.shape == (1, 64, 64)
    assert image.prior.config.embedding_proj_norm_type == "layer"


def test_check_latents_names_file_and_shapes(tiny: ShapEComponents) -> None:
    assert tiny.check_latents(torch.zeros(3, 64, 32), "batch 0") is not None
    assert tiny.check_latents(torch.zeros(64, 32), "x.pt") is not None
    with pytest.raises(LatentShapeError, match=r"latents/chair\.pt: latent shape \(1024, 1024\)"):
        tiny.check_latents(torch.zeros(1024, 1024), "latents/chair.pt")
    with pytest.raises(LatentShapeError, match=r"expects \(64, 32\)"):
        tiny.check_latents(torch.zeros(2, 2, 64, 32), "batch 3")


def test_pretrained_components_round_trip_and_offline_error(tiny, tmp_path) -> None:
    folder = tmp_path / "shap-e"
    tiny.prior.save_pretrained(folder / "prior")
    tiny.scheduler.save_pretrained(folder / "scheduler")
    tiny.renderer.save_pretrained(folder / "shap_e_renderer")
    tiny.text_encoder.save_pretrained(folder / "text_encoder")
    tiny.tokenizer.save_pretrained(folder / "tokenizer")
    loaded = pretrained_components(str(folder), "text")
    assert loaded.latent_shape == tiny.latent_shape
    for a, b in zip(loaded.renderer.parameters(), tiny.renderer.parameters(), strict=True):
        assert torch.equal(a, b)
    assert loaded.tokenizer("a chair").input_ids == tiny.tokenizer("a chair").input_ids

    # the img2img layout: image_encoder/ + image_processor/ instead of the text parts
    image = tiny_components("image", seed=0)
    folder = tmp_path / "shap-e-img2img"
    for name, part in [
        ("prior", image.prior),
        ("scheduler", image.scheduler),
        ("shap_e_renderer", image.renderer),
        ("image_encoder", image.image_encoder),
        ("image_processor", image.image_processor),
    ]:
        part.save_pretrained(folder / name)
    loaded = pretrained_components(str(folder), "image")
    assert loaded.conditioning == "image" and loaded.tokenizer is None
    assert loaded.image_processor.crop_size == image.image_processor.crop_size
    first = next(loaded.image_encoder.parameters())
    assert torch.equal(first, next(image.image_encoder.parameters()))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsUnavailableError) as info:
        pretrained_components(str(empty), "text")
    message = str(info.value)
    assert "\n" not in message and str(empty) in message and "tiny" in message


def test_query_fields_matches_diffusers_mlp(tiny: ShapEComponents) -> None:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, *tiny.latent_shape, generator=gen)
    points = torch.rand(2, 300, 3, generator=gen) * 2 - 1
    fields = query_fields(tiny.renderer, latents, points)
    assert fields["sdf"].shape == (2, 300) and fields["rgb"].shape == (2, 300, 3)
    for index in range(2):  # diffusers' decode_to_mesh: copy the projected weights, run the MLP
        renderer = copy.deepcopy(tiny.renderer)
        with torch.no_grad():
            projected = renderer.params_proj(latents[index : index + 1])
            for name, param in renderer.mlp.state_dict().items():
                if f"nerstf.{name}" in projected:
                    param.copy_(projected[f"nerstf.{name}"].squeeze(0))
            ref = renderer.mlp(
                position=points[index : index + 1],
                direction=None,
                ts=None,
                nerf_level="fine",
                rendering_mode="stf",
            )
        torch.testing.assert_close(fields["sdf"][index], ref.signed_distance[0, :, 0])
        torch.testing.assert_close(fields["rgb"][index], ref.channels[0])
    # shared points broadcast over the batch
    shared = query_fields(tiny.renderer, latents, points[0])["sdf"]
    torch.testing.assert_close(shared[0], fields["sdf"][0])


def test_gradient_reaches_latent(tiny: ShapEComponents) -> None:
    latents = torch.randn(2, *tiny.latent_shape, requires_grad=True)
    fields = query_fields(tiny.renderer, latents, torch.rand(2, 64, 3) * 2 - 1)
    (fields["sdf"].sum() + fields["rgb"].sum()).backward()
    assert latents.grad is not None
    assert latents.grad.abs().sum(dim=(1, 2)).min() > 0  # every sample gets a gradient


def test_grid_points_follow_diffusers_order() -> None:
    from diffusers.pipelines.shap_e.renderer import BoundingBoxVolume, volume_query_points

    volume = BoundingBoxVolume(bbox_min=[-1.0] * 3, bbox_max=[1.0] * 3)
    torch.testing.assert_close(grid_points(5), volume_query_points(volume, 5))


def test_sphere_latent_decodes_to_sphere_mesh(tiny, sphere_latent, tmp_path) -> None:
    latent, losses = sphere_latent
    assert losses[-1] < losses[0] / 20
    (mesh,) = decode_meshes(tiny.renderer, latent, grid_size=32)
    assert mesh is not None and mesh.is_watertight
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radii.mean() - 0.5) < 0.08 and radii.std() < 0.15
    assert mesh.volume > 0  # outward-wound faces
    assert abs(mesh.volume - 4 / 3 * np.pi * 0.5**3) < 0.35 * (4 / 3 * np.pi * 0.5**3)
    colors = mesh.visual.vertex_colors
    assert colors.shape == (len(mesh.vertices), 4) and colors.dtype == np.uint8
    path = tmp_path / "sphere.ply"
    mesh.export(path)
    import trimesh

    assert len(trimesh.load(path, process=False).vertices) == len(mesh.vertices)


def test_empty_surface_gives_none_with_warning(tiny: ShapEComponents) -> None:
    latents = torch.randn(2, *tiny.latent_shape)
    with pytest.warns(EmptySurfaceWarning, match="sample 0: empty surface"):
        meshes = decode_meshes(tiny.renderer, latents, grid_size=8, level=1.5)
    assert meshes == [None, None]
    frames = render_views(tiny.renderer, latents, size=16, num_views=2, meshes=meshes)
    assert frames.shape == (2, 2, 16, 16, 3) and (frames == 255).all()


def test_render_views_and_gif(tiny, sphere_latent, tmp_path) -> None:
    from PIL import Image

    latent, _ = sphere_latent
    frames = render_views(tiny.renderer, latent, size=32, num_views=4, grid_size=32)
    assert frames.shape == (1, 4, 32, 32, 3) and frames.dtype == np.uint8
    covered = (frames[0] != 255).any(axis=-1).mean(axis=(1, 2))
    # a radius-0.5 sphere at distance 4, 40 degree field of view covers ~13% of the image
    assert np.all((covered > 0.06) & (covered < 0.25))
    assert (frames[0, :, 16, 16] != 255).any(axis=-1).all()  # the centre pixel shows the object
    frames[0, :, 0, 0] = np.arange(4)[:, None] * 40  # make consecutive frames distinct
    path = write_turntable_gif(frames[0], tmp_path / "turn.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.size == (32, 32)
    with pytest.raises(ValueError, match="uint8"):
        write_turntable_gif(frames[0].astype(np.float32), tmp_path / "bad.gif")


def test_tiny_renderer_is_the_tiny_components_renderer(tiny: ShapEComponents) -> None:
    from genlab.models.shape_e.components import renderer_latent_shape, tiny_renderer

    alone = tiny_renderer(seed=0)
    assert renderer_latent_shape(alone) == tiny.latent_shape
    for a, b in zip(alone.parameters(), tiny.renderer.parameters(), strict=True):
        assert torch.equal(a, b)
    other = tiny_renderer(seed=1)
    assert not torch.equal(next(other.parameters()), next(alone.parameters()))


def test_render_rays_agrees_with_the_mesh_render(tiny, sphere_latent) -> None:
    """Two independent paths: compositing occupancy along camera rays (differentiable) and
    rasterising the marching-cubes mesh cover the same pixels of the fitted sphere."""
    from genlab.models.shape_e.decode import camera_rays, render_rays, turntable_cameras

    latent, _ = sphere_latent
    camera = turntable_cameras(num_views=3, size=32)[1]
    origins, directions = camera_rays(camera, 32)
    torch.testing.assert_close(origins[0], torch.tensor(camera.position, dtype=torch.float32))
    frames = render_views(tiny.renderer, latent, size=32, num_views=3, grid_size=32)
    mesh_mask = (frames[0, 1] != 255).any(axis=-1)
    trainable = latent.clone().requires_grad_(True)
    out = render_rays(tiny.renderer, trainable, origins[None], directions[None], sharpness=10.0)
    alpha = out["alpha"][0].reshape(32, 32).detach().numpy()
    assert ((alpha > 0.5) == mesh_mask).mean() > 0.95
    assert out["rgb"].shape == (1, 32 * 32, 3)
    # pixels off the object show the background (1.0)
    assert np.allclose(out["rgb"][0].detach().numpy()[(alpha < 0.01).ravel()], 1.0, atol=0.02)
    out["rgb"].mean().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0
