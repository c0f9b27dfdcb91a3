"""Training-step time of the multi-view diffusion model: our multi-view + cross-domain attention
processors against the same UNet with diffusers' default processors, same weights, same batch.

    python bench/mv_step.py [--batch 2] [--views 4] [--size 64] [--steps 20]
    python bench/mv_step.py --real-size [--batch 1] [--views 6] [--size 256] [--steps 10]

Default: the tiny model (``model=mv_diffusion_tiny``: tiny UNet, VAE and CLIP encoder, random
weights) and its whole training step (VAE + CLIP encoding, UNet forward/backward, AdamW), on
the CPU unless a GPU is present. The two processor sets are timed in alternating rounds.

``--real-size``: a Stable-Diffusion-1.x-sized UNet (diffusers' default ``UNet2DConditionModel``
config, cross_attention_dim 768, in_channels 8, a 10-dim camera projection: the image-variation
UNet) with random weights -- nothing is downloaded -- at 256 px (32 x 32 latents), 6 views x 2
domains per object. It times the UNet part of the step (forward, backward, AdamW; the frozen
VAE and CLIP encoder are left out, latents and the image embedding are random), in bf16
autocast on CUDA, and prints steps/s and peak GPU memory with and without gradient
checkpointing, for our processors and for the default ones.

The last line is always ``ratio: <ours / default>`` (step time; 1.0 = multi-view attention
costs nothing extra; for --real-size, without gradient checkpointing).
"""

from __future__ import annotations

import argparse
import time

import torch

from genlab.models.mv_diffusion.networks import (
    TINY_IMAGE_ENCODER,
    TINY_UNET,
    TINY_VAE,
    build_image_encoder,
    build_unet,
    build_vae,
    real_size_unet_config,
)
from genlab.nn.multiview_attention import install_multiview_attention


def default_processors(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# tiny: the whole training step of the LightningModule
# --------------------------------------------------------------------------------------------


def tiny_batch(b: int, n: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {
        "image_cond_vae": torch.rand(b, 1, 3, size, size, generator=g).expand(b, n, -1, -1, -1),
        "image_target_vae": torch.rand(b, n, 3, size, size, generator=g) * 2 - 1,
        "normal_target_vae": torch.rand(b, n, 3, size, size, generator=g) * 2 - 1,
        "image_cond_CLIP": torch.randn(b, 1, 3, 224, 224, generator=g).expand(b, n, -1, -1, -1),
        "camera_embed_image": torch.randn(b, n, 10, generator=g),
        "camera_embed_normal": torch.randn(b, n, 10, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def bench_tiny(args: argparse.Namespace, device: torch.device) -> None:
    from functools import partial

    from diffusers import DDPMScheduler

    from genlab.models.mv_diffusion.module import MultiViewDiffusion

    torch.manual_seed(0)
    model = MultiViewDiffusion(
        unet=build_unet(config={**TINY_UNET, "sample_size": args.size // 8}),
        vae=build_vae(config=TINY_VAE),
        image_encoder=build_image_encoder(config=TINY_IMAGE_ENCODER),
        noise_scheduler=DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        ),
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
        num_views=args.views,
        image_size=args.size,
        mvcd_attention=True,
        cd_attention_mid=True,
        cd_attention_last=True,
        view_elevations=[0.0] * args.views,
        view_azimuths=[360.0 * i / args.views for i in range(args.views)],
    ).to(device)
    model.train()
    ours = dict(model.unet.attn_processors)
    optimizer = model.configure_optimizers()
    batch = tiny_batch(args.batch, args.views, args.size, device)

    def step() -> float:
        sync(device)
        t = time.perf_counter()
        loss = model.diffusion_loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"ours": [], "default": []}
    for _ in range(args.warmup):
        step()
    for _ in range(args.rounds):
        for name in ("ours", "default"):
            if name == "ours":
                model.unet.set_attn_processor(dict(ours))
            else:
                default_processors(model.unet)
            times[name].extend(step() for _ in range(max(1, args.steps // args.rounds)))
    unet_batch = args.batch * 2 * args.views
    print(
        f"tiny mv_diffusion training step on {device}: {args.batch} objects x 2 domains x "
        f"{args.views} views = {unet_batch} UNet images at {args.size} px "
        f"({args.size // 8}x{args.size // 8} latents), {len(times['ours'])} steps each"
    )
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"ours (multi-view + cross-domain processors): {med['ours'] * 1e3:8.1f} ms/step (median)")
    print(
        f"default processors (AttnProcessor2_0):       {med['default'] * 1e3:8.1f} ms/step (median)"
    )
    print(f"ratio: {med['ours'] / med['default']:.3f}")


# --------------------------------------------------------------------------------------------
# real size: the UNet part of the step
# --------------------------------------------------------------------------------------------


def bench_real(args: argparse.Namespace, device: torch.device) -> None:
    from diffusers import UNet2DConditionModel

    latent = args.size // 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **real_size_unet_config(cross_attention_dim=768, sample_size=latent),
        in_channels=8,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=10,
    ).to(device)
    unet.train()
    n_params = sum(p.numel() for p in unet.parameters())
    install_multiview_attention(unet, args.views, True, cd_attention_mid=True)
    ours = dict(unet.attn_processors)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    total = args.batch * 2 * args.views
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(total, 4, latent, latent, generator=g).to(device)
    cond = torch.randn(args.batch, 4, latent, latent, generator=g).to(device)
    cond = cond.repeat_interleave(2 * args.views, 0)
    context = (
        torch.randn(args.batch, 1, 768, generator=g).to(device).repeat_interleave(2 * args.views, 0)
    )
    cameras = torch.randn(total, 10, generator=g).to(device)
    target = torch.randn(total, 4, latent, latent, generator=g).to(device)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    timesteps = timesteps.repeat_interleave(2 * args.views)
    use_bf16 = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = unet(
                torch.cat([noisy, cond], 1),
                timesteps,
                encoder_hidden_states=context,
                class_labels=cameras,
            ).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    print(
        f"real-size UNet ({n_params / 1e6:.0f} M parameters, random weights) on {device}"
        f"{' in bf16 autocast' if use_bf16 else ' in fp32'}: {args.batch} object(s) x 2 domains "
        f"x {args.views} views = {total} images at {args.size} px ({latent}x{latent} latents)"
    )
    results: dict[tuple[str, bool], float] = {}
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        for name in ("ours", "default"):
            if name == "ours":
                unet.set_attn_processor(dict(ours))
            else:
                default_processors(unet)
            for _ in range(args.warmup):
                step()
            sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            per_step = (time.perf_counter() - t) / args.steps
            results[(name, checkpointing)] = per_step
            peak = (
                f"{torch.cuda.max_memory_allocated(device) / 2**30:6.2f} GiB peak"
                if device.type == "cuda"
                else "peak memory: n/a (CPU)"
            )
            label = "ours   " if name == "ours" else "default"
            print(
                f"{label} processors, gradient checkpointing {'on ' if checkpointing else 'off'}: "
                f"{1 / per_step:6.2f} steps/s ({per_step * 1e3:8.1f} ms/step), {peak}"
            )
    print(
        "ratio with gradient checkpointing: "
        f"{results[('ours', True)] / results[('default', True)]:.3f}"
    )
    print(f"ratio: {results[('ours', False)] / results[('default', False)]:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-size", action="store_true", help="SD-1.x-sized UNet (GPU)")
    parser.add_argument("--batch", type=int, default=None, help="objects per step")
    parser.add_argument("--views", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="alternations (tiny)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    real = args.real_size
    args.batch = args.batch or (1 if real else 2)
    args.views = args.views or (6 if real else 4)
    args.size = args.size or (256 if real else 64)
    args.steps = args.steps or (10 if real else 20)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    (bench_real if real else bench_tiny)(args, device)


if __name__ == "__main__":
    main()
