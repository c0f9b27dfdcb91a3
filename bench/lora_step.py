"""Training-step time of the DreamBooth LoRA LightningModule (``model=lora_sd_tiny``, through a
Lightning Trainer) against a plain PyTorch loop doing the same LoRA step on the same networks.

    python bench/lora_step.py [--batch 4] [--resolution 64] [--steps 20] [--warmup 5] [--threads N]
    python bench/lora_step.py --real-size sd15|sdxl [--batch 1] [--resolution 512|1024] [--steps 10]

Default: ``LoRADreamBooth`` built from ``conf/model/lora_sd_tiny.yaml`` (tiny random-weight SD
1.x-style UNet, VAE and CLIP text encoder) is fit by a ``lightning.pytorch.Trainer`` for
``warmup + steps`` steps on an in-memory loader of fixed random batches shaped like the
``sks_toy`` ones (``pixel_values`` (B, 3, R, R) in [-1, 1], ``prompt``, ``original_size``,
``crop_top_left``); no validation, logger, checkpointing or progress bar. A callback times each
step (``on_train_batch_start`` -> ``on_train_batch_end``: training_step, backward, AdamW step).
The reference is a hand-written loop over the same tiny components (built by the same function
with the same seed: identical base weights, and the same LoRA initialisation): peft ``LoraConfig``
on to_q/to_k/to_v/to_out.0 added with ``unet.add_adapter``, AdamW on the LoRA weights, then per
batch VAE encode -> noise -> timesteps -> tokenize + text encode -> UNet -> MSE -> backward ->
optimiser + LR scheduler step -> zero_grad. One reference step runs beside each of ours (after
it on even steps, before it on odd ones), so machine noise hits both; both discard the same
``warmup`` steps and report the median of the same number of timed steps. Same batch,
resolution, dtype (float32) and threads. Also printed: the median of the per-step ratios (each
of our steps against its neighbouring reference step), steadier on a busy machine. The last
line is ``ratio: <median ours / median reference>`` (1.0 = the module and the Trainer cost
nothing extra).

``--real-size sd15|sdxl`` (a CUDA GPU): the real-size architectures from their configs with
random weights, nothing downloaded -- SD 1.5 (UNet 320/640/1280/1280, CLIP ViT-L/14 text encoder)
or SDXL base (UNet 320/640/1280 with 1/2/10 transformer layers and text_time conditioning, CLIP
ViT-L/14 + bigG/14 text encoders), the SD VAE, and CLIP's BPE tokenizer built offline -- given
to ``LoRADreamBooth`` through its ``tiny`` config (built directly on the GPU). Our module is fit
by a Trainer at ``bf16-mixed`` (frozen base cast to bfloat16, LoRA weights float32, as the module
does on a GPU), batch 1 at 512 px (sd15) / 1024 px (sdxl), with and without gradient
checkpointing: steps/s and the peak of ``torch.cuda.max_memory_allocated`` during training. The
last line is ``ratio: <peak GiB with checkpointing / goal GiB>`` with goal 8 GiB (sd15) or
16 GiB (sdxl): <= 1 meets the goal. A run that runs out of GPU memory is reported as OOM (with
the peak reached) and the other one still runs; OOM with checkpointing gives ``ratio: inf``.

Both modes compose the model config as the CLI does (``conf/train.yaml`` + ``model=...``), so
CLIP's tokenizer files are written once into the project cache (``$GENLAB_CACHE_DIR``, default
``.cache/genlab``), which needs open_clip's BPE file the first time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import (
    GIB,
    Interleaved,
    all_cores,
    median,
    model_config,
    quiet,
    sync,
    trainer,
)
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset

from genlab.models.lora_sd import Components, LoRADreamBooth, build_tiny_components

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PROMPT = "a photo of sksToy toy"

# ------------------------------------------------------------------------------------------------
# real-size architectures (the published configs; random weights)
# ------------------------------------------------------------------------------------------------

SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# CLIP ViT-L/14 text tower (SD 1.x, and SDXL's first encoder)
CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

# OpenCLIP bigG/14 text tower with its projection (SDXL's second encoder)
CLIP_BIGG_TEXT = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "use_linear_projection": False,
}

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,  # 768 (ViT-L) + 1280 (bigG) side by side
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size/crop ids x 256 + 1280 pooled
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

REAL_SIZE = {
    # name: (model config, tiny components, default resolution, goal GiB with checkpointing)
    "sd15": (
        "lora_sd_tiny",
        {"unet": SD15_UNET, "vae": SD_VAE, "text_encoder": CLIP_L_TEXT, "text_encoder_2": None},
        512,
        8.0,
    ),
    "sdxl": (
        "lora_sdxl_tiny",
        {
            "unet": SDXL_UNET,
            "vae": SDXL_VAE,
            "text_encoder": CLIP_L_TEXT,
            "text_encoder_2": CLIP_BIGG_TEXT,
        },
        1024,
        16.0,
    ),
}

# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------


class FixedBatches(Dataset):
    """The same random photos every epoch, as the ``sks_toy`` loader yields them (one item each)."""

    def __init__(self, n: int, resolution: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1
        self.sizes = torch.tensor([[3024, 4032], [4032, 3024]], dtype=torch.int64)[
            torch.arange(n) % 2
        ]
        self.crops = torch.randint(0, resolution // 4, (n, 2), generator=g, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "pixel_values": self.pixels[i],
            "prompt": PROMPT,
            "original_size": self.sizes[i],
            "crop_top_left": self.crops[i],
        }


# ------------------------------------------------------------------------------------------------
# default: ours (Trainer) against a plain loop, tiny SD
# ------------------------------------------------------------------------------------------------


def reference_steps(
    parts: Components,
    cfg: DictConfig,
    loader: DataLoader,
    device: torch.device,
    total_steps: int,
) -> Iterator[float | None]:
    """A plain DreamBooth-LoRA training loop; yields None once set up, then each step's time.

    Written the way a standalone diffusers training script is: freeze everything, add the LoRA
    adapters to the UNet, AdamW + LR scheduler on the trainable weights, then the loop.
    """
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    unet, vae, text_encoder = parts.unet, parts.vae, parts.text_encoder
    tokenizer, noise_scheduler = parts.tokenizer, parts.noise_scheduler
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    lora = cfg.lora
    torch.manual_seed(0)  # the module's adapters were initialised from the same state
    unet.add_adapter(
        LoraConfig(
            r=int(lora.rank),
            lora_alpha=float(lora.alpha),
            lora_dropout=float(lora.dropout),
            init_lora_weights=lora.init,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    unet.to(device)
    vae.to(device)
    text_encoder.to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        params,
        lr=float(opt.lr),
        betas=tuple(opt.betas),
        weight_decay=float(opt.weight_decay),
        eps=float(opt.eps),
    )
    lr_scheduler = get_scheduler(
        "constant_with_warmup",
        optimizer=optimizer,
        num_warmup_steps=0,
        num_training_steps=total_steps,
    )
    unet.train()
    yield None  # set up
    while True:
        for batch in loader:
            sync(device)
            start = time.perf_counter()
            pixel_values = batch["pixel_values"].to(device)
            latents = vae.encode(pixel_values).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device
            ).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            input_ids = tokenizer(
                list(batch["prompt"]),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            encoder_hidden_states = text_encoder(input_ids)[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            sync(device)
            yield time.perf_counter() - start


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same parameter names and values (LoRA adapters included)."""
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


def bench_tiny(args: argparse.Namespace, device: torch.device, tmp: str) -> None:
    cfg = model_config(
        "lora_sd_tiny",
        [f"model.resolution={args.resolution}"],
    )
    tiny = OmegaConf.to_container(cfg.tiny, resolve=True)
    total = args.warmup + args.steps
    data = FixedBatches(4 * args.batch, args.resolution)
    ours_loader = DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0)
    ref_loader = DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0)

    torch.manual_seed(0)  # the adapters' initialisation (the reference starts from the same state)
    model: LoRADreamBooth = instantiate(cfg)
    parts = build_tiny_components(**tiny)  # same function, same seed: the same networks
    reference = reference_steps(parts, cfg, ref_loader, device, total)
    next(reference)  # frozen, adapted, optimiser ready
    identical = all(
        same_weights(getattr(model, name), getattr(parts, name))
        for name in ("unet", "vae", "text_encoder")
    )
    timer = Interleaved(device, reference)
    fit = trainer(total, device, "32-true", [timer], tmp)
    fit.fit(model, train_dataloaders=ours_loader)
    if len(timer.ours) != total or len(timer.theirs) != total:
        raise RuntimeError(
            f"expected {total} steps each, got {len(timer.ours)} / {len(timer.theirs)}"
        )
    ours, theirs = timer.ours[args.warmup :], timer.theirs[args.warmup :]
    n_lora = sum(p.numel() for _, p in model.lora_parameters())
    print(
        f"device: {device}{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}; "
        f"tiny SD (model=lora_sd_tiny, {n_lora} LoRA weights, rank {cfg.lora.rank}), float32, "
        f"batch {args.batch} at {args.resolution} px, {args.warmup} warm-up + {args.steps} timed "
        f"steps each, alternated step by step; identical weights (base + LoRA init): {identical}"
    )
    print(
        f"plain loop (peft add_adapter + AdamW): {median(theirs) * 1e3:8.2f} ms/step "
        f"(median of {len(theirs)})"
    )
    print(
        f"genlab LoRADreamBooth (Trainer):       {median(ours) * 1e3:8.2f} ms/step "
        f"(median of {len(ours)})"
    )
    paired = median([a / b for a, b in zip(ours, theirs, strict=True)])
    print(f"median of the per-step ratios (each step against its neighbour): {paired:.3f}")
    print(f"ratio: {median(ours) / median(theirs):.3f}")


# ------------------------------------------------------------------------------------------------
# --real-size: steps/s and peak memory of our step on a GPU, with and without checkpointing
# ------------------------------------------------------------------------------------------------


class PeakTimer(_common.PeakTimer):
    """Also records the dtypes of the frozen base and of the LoRA weights."""

    dtypes = ""

    def on_train_start(self, trainer: pl.Trainer, module: LoRADreamBooth) -> None:
        base = next(p for n, p in module.unet.named_parameters() if "lora_" not in n)
        lora = next(p for _, p in module.lora_parameters())
        self.dtypes = f"frozen base {base.dtype}, LoRA {lora.dtype}".replace("torch.", "")
        super().on_train_start(trainer, module)


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_real(
    args: argparse.Namespace,
    device: torch.device,
    tmp: str,
    checkpointing: bool,
) -> dict[str, Any]:
    name, parts, _, _ = REAL_SIZE[args.real_size]
    cfg = model_config(
        name,
        [
            f"model.resolution={args.resolution}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
        ],
    )
    if args.dims == "real":
        with open_dict(cfg):
            for key, value in parts.items():
                cfg.tiny[key] = value
            cfg.tiny.scheduler = SD_SCHEDULER
    result: dict[str, Any] = {"checkpointing": checkpointing, "error": None, "peak": None}
    model = fit = None
    timer = PeakTimer(device)
    try:
        build_start = time.perf_counter()
        # weights are initialised where they will run: seconds on a GPU, minutes on a CPU
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            model = instantiate(cfg)
        result["build_s"] = time.perf_counter() - build_start
        result["unet_params"] = sum(p.numel() for p in model.unet.parameters())
        result["lora_params"] = sum(p.numel() for _, p in model.lora_parameters())
        result["rank"] = int(cfg.lora.rank)
        data = FixedBatches(max(2, args.batch), args.resolution)
        loader = DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0)
        fit = trainer(args.warmup + args.steps, device, "bf16-mixed", [timer], tmp)
        fit.fit(model, train_dataloaders=loader)
        result["ms"] = median(timer.times[args.warmup :]) * 1e3
        result["dtypes"] = timer.dtypes
        result["peak"] = timer.peak
    except torch.OutOfMemoryError as err:
        result["error"] = "out of memory: " + " ".join(str(err).split())[:160]
        # up to the failed allocation
        result["peak"] = timer.peak if timer.peak is not None else timer.read_peak()
    del model, fit
    free_cuda()
    return result


def bench_real(args: argparse.Namespace, device: torch.device, tmp: str) -> None:
    _, _, _, goal = REAL_SIZE[args.real_size]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        where = f"{device} ({name}, {total:.0f} GiB)"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        where = f"{device} ({torch.get_num_threads()} threads; peak memory not measured)"
    dims = "real-size" if args.dims == "real" else "TINY dims (dry run of the real-size path)"
    print(
        f"device: {where}; {args.real_size} {dims}, random weights, bf16-mixed, batch "
        f"{args.batch} at {args.resolution} px, {args.warmup} warm-up + {args.steps} timed steps"
    )
    results = []
    for checkpointing in (True, False):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results.append(run_real(args, device, tmp, checkpointing))
    built = [r for r in results if "unet_params" in r]
    first = next((r for r in built if r.get("dtypes")), built[0] if built else None)
    if first is not None:
        print(
            f"UNet {first['unet_params'] / 1e6:.0f} M parameters, {first['lora_params'] / 1e6:.2f} M "
            f"LoRA weights (rank {first['rank']}); "
            f"{first.get('dtypes') or 'no step ran'}; built in {first['build_s']:.1f} s"
        )
    print(f"{'gradient checkpointing':<24}{'steps/s':>9}{'ms/step':>11}{'peak GiB':>10}")
    for r in results:
        label = "on" if r["checkpointing"] else "off"
        peak = f"{r['peak']:10.2f}" if r["peak"] is not None else f"{'n/a':>10}"
        if r["error"]:
            print(f"{label:<24}{'OOM':>9}{'-':>11}{peak}  ({r['error']})")
        else:
            print(f"{label:<24}{1e3 / r['ms']:9.2f}{r['ms']:11.1f}{peak}")
    with_ckpt = results[0]
    if with_ckpt["error"]:
        ratio = math.inf
    else:
        ratio = math.nan if with_ckpt["peak"] is None else with_ckpt["peak"] / goal
    print(f"goal: {goal:.0f} GiB peak with gradient checkpointing (ratio <= 1 meets it)")
    print(f"ratio: {ratio:.3f}")


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Training step of LoRADreamBooth: against a plain loop (tiny model), or "
        "steps/s and peak GPU memory at real size (--real-size)."
    )
    parser.add_argument(
        "--real-size",
        choices=sorted(REAL_SIZE),
        default=None,
        help="real-size SD 1.5 / SDXL base architecture with random weights (CUDA GPU)",
    )
    parser.add_argument("--batch", type=int, default=None, help="4 (tiny) / 1 (real size)")
    parser.add_argument(
        "--resolution", type=int, default=None, help="pixels: 64 (tiny) / 512 sd15 / 1024 sdxl"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps: 20 / 10")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps: 5 / 3")
    parser.add_argument(
        "--threads",
        type=int,
        default=all_cores(),
        help="torch.set_num_threads (default: every core this process may use)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu | cuda (default: cpu for the tiny comparison, cuda for --real-size)",
    )
    # tiny dims on the real-size path: a check of that code path without a GPU
    parser.add_argument("--dims", choices=("real", "tiny"), default="real", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    real = args.real_size is not None
    args.batch = args.batch or (1 if real else 4)
    args.resolution = args.resolution or (REAL_SIZE[args.real_size][2] if real else 64)
    args.steps = args.steps or (10 if real else 20)
    args.warmup = args.warmup if args.warmup is not None else (3 if real else 5)
    device = torch.device(args.device or ("cuda" if real else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "lora_step.py: --device cuda / --real-size needs a CUDA GPU and none is visible "
            "(the default mode runs on the CPU)"
        )
    if real and device.type != "cuda" and args.dims == "real":
        raise SystemExit("lora_step.py: --real-size runs on a CUDA GPU (--device cuda)")
    torch.set_num_threads(args.threads)
    quiet()
    with tempfile.TemporaryDirectory(prefix="lora_step-") as tmp:
        (bench_real if real else bench_tiny)(args, device, tmp)


if __name__ == "__main__":
    main()
