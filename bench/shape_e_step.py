"""Training-step time of the Shap-E prior fine-tuning module (``model=shape_e_tiny``, through a
Lightning Trainer) against a bare diffusers + torch loop doing the same step on the same prior.

    python bench/shape_e_step.py [--batch 4] [--steps 30] [--warmup 5] [--threads N]
    python bench/shape_e_step.py --real-size [--batch 4] [--steps 10] [--warmup 3] [--finetune full|lora]

Default: ``ShapEPriorFineTune`` built from ``conf/model/shape_e_tiny.yaml`` (tiny random-weight
PriorTransformer with (64, 32) latents, 2-layer CLIP text model with CLIP's real tokenizer) is
fit by a ``lightning.pytorch.Trainer`` for ``warmup + steps`` steps on an in-memory loader of
fixed random latents in [-1, 1] with captions; no validation, logger, checkpointing or progress
bar. The reference is a hand-written loop over the same parts (built by the same function with
the same seed: identical weights): tokenize + CLIP text encode (normalised, times sqrt(dim)),
condition dropout 0.1, integer timesteps of the 1024, ``x0 + sigma * eps`` scaled by
``1 / sqrt(sigma^2 + 1)``, prior forward, MSE of the first D channels against x0, backward,
AdamW step, zero_grad. One reference step runs beside each of ours (after it on even steps,
before it on odd ones); both discard the same warm-up steps and report the median of the same
number of timed steps, at the same batch, dtype (float32) and threads. The last line is
``ratio: <median ours / median reference>`` (1.0: the module and the Trainer cost nothing).

``--real-size`` (a CUDA GPU): the released text300M architecture from its config with random
weights, nothing downloaded -- PriorTransformer with 1024 x 1024 latents, 24 layers of
16 x 64 heads, 768-wide CLIP conditioning (diffusers' conversion of ``text_cond.pt``), the CLIP
ViT-L/14 text tower, and a renderer of the released shape -- fit by a Trainer at ``bf16-mixed``,
batch 4, with and without gradient checkpointing: steps/s and the peak of
``torch.cuda.max_memory_allocated``. The last line is ``ratio: <step time with checkpointing /
step time without>`` (the price of checkpointing). ``--device cpu --real-size`` runs the same
path on a CPU (float32, slow: a check that it builds and steps, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import (
    Interleaved,
    PeakTimer,
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

from genlab.models.shape_e.components import tiny_components

CAPTIONS = ["a red vase with patterns", "a wooden chair", "a small blue car", "a green mug"]

# ------------------------------------------------------------------------------------------------
# the released text300M architecture (random weights)
# ------------------------------------------------------------------------------------------------

TEXT300M_PRIOR = {
    "num_attention_heads": 16,
    "attention_head_dim": 64,
    "num_layers": 24,
    "embedding_dim": 1024,
    "num_embeddings": 1024,
    "additional_embeddings": 0,
    "time_embed_act_fn": "gelu",
    "norm_in_type": "layer",
    "encoder_hid_proj_type": None,
    "added_emb_type": None,
    "time_embed_dim": 4096,
    "embedding_proj_dim": 768,
    "clip_embed_dim": 2048,
}
# CLIP ViT-L/14 text tower with its 768-d projection
CLIP_L_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
# the released renderer: 4 x 256 latent tokens -> the first 4 MLP weights of a 256-wide NeRSTF
RELEASED_RENDERER = {
    "param_shapes": [[256, 93], [256, 256], [256, 256], [256, 256]],
    "d_latent": 1024,
    "d_hidden": 256,
    "n_output": 12,
}


class FixedLatents(Dataset):
    """The same random latents and captions every epoch, as the objaverse loader yields them."""

    def __init__(self, n: int, shape: tuple[int, int]) -> None:
        g = torch.Generator().manual_seed(0)
        self.latents = torch.rand(n, *shape, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "latent": self.latents[i],
            "caption": CAPTIONS[i % len(CAPTIONS)],
            "object_id": f"obj_{i:04d}",
        }


def tiny_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(cfg.components, resolve=True)
    kwargs.pop("_target_")
    return kwargs


# ------------------------------------------------------------------------------------------------
# default: ours (Trainer) against a bare loop, tiny prior
# ------------------------------------------------------------------------------------------------


def reference_steps(
    parts: Any, cfg: DictConfig, loader: DataLoader, device: torch.device
) -> Iterator[float | None]:
    """A bare diffusers + torch prior fine-tuning loop; yields None once set up, then step times."""
    prior, text_encoder, tokenizer = parts.prior, parts.text_encoder, parts.tokenizer
    alphas_cumprod = parts.scheduler.alphas_cumprod.to(device)
    text_encoder.requires_grad_(False).eval().to(device)
    prior.to(device).train()
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        prior.parameters(),
        lr=float(opt.lr),
        betas=tuple(opt.betas),
        weight_decay=float(opt.weight_decay),
        eps=float(opt.eps),
    )
    tokenizer.pad_token_id = 0
    dim = int(prior.config.embedding_dim)
    yield None
    while True:
        for batch in loader:
            sync(device)
            start = time.perf_counter()
            x0 = batch["latent"].to(device)
            ids = tokenizer(
                list(batch["caption"]),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            with torch.no_grad():
                emb = text_encoder(ids).text_embeds
                emb = emb / emb.norm(dim=-1, keepdim=True) * math.sqrt(emb.shape[-1])
            keep = (torch.rand(len(x0), device=device) >= float(cfg.cond_dropout)).float()
            emb = emb * keep[:, None]
            t = torch.randint(0, len(alphas_cumprod), (len(x0),), device=device)
            abar = alphas_cumprod[t].reshape(-1, 1, 1)
            sigma = ((1 - abar) / abar) ** 0.5
            noise = torch.randn_like(x0)
            model_input = (x0 + sigma * noise) / (sigma**2 + 1) ** 0.5
            out = prior(model_input, timestep=t.float(), proj_embedding=emb)
            loss = F.mse_loss(out.predicted_image_embedding[..., :dim], x0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            sync(device)
            yield time.perf_counter() - start


class LightningFloor(pl.LightningModule):
    """The reference step, verbatim, inside a minimal LightningModule: what the Trainer alone
    costs per step (hooks, optimiser wrapper, loop bookkeeping), with no genlab code."""

    def __init__(self, parts: Any, cfg: DictConfig) -> None:
        super().__init__()
        self.parts, self.cfg = parts, cfg
        self.prior = parts.prior
        self._steps: Iterator[torch.Tensor] | None = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        parts, cfg = self.parts, self.cfg
        x0 = batch["latent"]
        tokenizer = parts.tokenizer
        ids = tokenizer(
            list(batch["caption"]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(x0.device)
        with torch.no_grad():
            emb = parts.text_encoder(ids).text_embeds
            emb = emb / emb.norm(dim=-1, keepdim=True) * math.sqrt(emb.shape[-1])
        keep = (torch.rand(len(x0), device=x0.device) >= float(cfg.cond_dropout)).float()
        emb = emb * keep[:, None]
        alphas_cumprod = parts.scheduler.alphas_cumprod.to(x0.device)
        t = torch.randint(0, len(alphas_cumprod), (len(x0),), device=x0.device)
        abar = alphas_cumprod[t].reshape(-1, 1, 1)
        sigma = ((1 - abar) / abar) ** 0.5
        model_input = (x0 + sigma * torch.randn_like(x0)) / (sigma**2 + 1) ** 0.5
        out = self.prior(model_input, timestep=t.float(), proj_embedding=emb)
        return F.mse_loss(out.predicted_image_embedding[..., : x0.shape[-1]], x0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = self.cfg.optimizer
        return torch.optim.AdamW(
            self.prior.parameters(),
            lr=float(opt.lr),
            betas=tuple(opt.betas),
            weight_decay=float(opt.weight_decay),
            eps=float(opt.eps),
        )


def interleaved_fit(
    module: pl.LightningModule,
    cfg: DictConfig,
    args: argparse.Namespace,
    device: torch.device,
    tmp: str,
) -> tuple[list[float], list[float]]:
    """(ours, reference) step times after warm-up: ``module`` fit by a Trainer, one bare
    reference step (on a fresh copy of the same tiny parts) beside each of its steps."""
    total = args.warmup + args.steps
    data = FixedLatents(4 * args.batch, (64, 32))
    parts = tiny_components(**tiny_kwargs(cfg))  # same function, same seed: the same networks
    ref_loader = DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0)
    reference = reference_steps(parts, cfg, ref_loader, device)
    next(reference)
    timer = Interleaved(device, reference)
    loader = DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0)
    trainer(total, device, "32-true", [timer], tmp).fit(module, train_dataloaders=loader)
    if len(timer.ours) != total or len(timer.theirs) != total:
        raise RuntimeError(
            f"expected {total} steps each, got {len(timer.ours)} / {len(timer.theirs)}"
        )
    return timer.ours[args.warmup :], timer.theirs[args.warmup :]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


# --size small: the tiny latent (64, 32) with a 4-layer, 256-wide transformer, so that a step
# costs tens of milliseconds (as a real step does) rather than the few of the tests' prior, where
# Lightning's own fixed per-step cost (about 0.5 ms, also measured below) dominates
SMALL_PRIOR = {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 64}


def bench_tiny(args: argparse.Namespace, device: torch.device, tmp: str) -> None:
    cfg = model_config("shape_e_tiny", ["model.clip_scorer=null", f"paths.cache_dir={tmp}"])
    if args.size == "small":
        with open_dict(cfg):
            cfg.components.prior = dict(SMALL_PRIOR)
    model = instantiate(cfg)
    twin = tiny_components(**tiny_kwargs(cfg))
    identical = same_weights(model.prior, twin.prior) and same_weights(
        model.text_encoder, twin.text_encoder
    )
    ours, theirs = interleaved_fit(model, cfg, args, device, tmp)
    floor, floor_ref = interleaved_fit(LightningFloor(twin, cfg), cfg, args, device, tmp)
    n_params = sum(p.numel() for _, p in model.trainable_parameters())
    print(
        f"device: {device}{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}; "
        f"{args.size} Shap-E prior (model=shape_e_tiny, {n_params} trained weights, latent "
        f"{model.latent_shape}), float32, batch {args.batch}, {args.warmup} warm-up + "
        f"{args.steps} timed steps each, alternated; identical weights: {identical}"
    )
    print(f"bare diffusers + torch loop:         {median(theirs) * 1e3:8.2f} ms/step")
    print(f"genlab ShapEPriorFineTune (Trainer): {median(ours) * 1e3:8.2f} ms/step")
    print(
        f"Lightning floor (the bare step in a minimal LightningModule, same Trainer): "
        f"{median(floor) * 1e3:.2f} ms/step, {median(floor) / median(floor_ref):.3f} x its bare loop"
    )
    paired = median([a / b for a, b in zip(ours, theirs, strict=True)])
    print(f"median of the per-step ratios: {paired:.3f}")
    print(f"ratio: {median(ours) / median(theirs):.3f}")


# ------------------------------------------------------------------------------------------------
# --real-size: steps/s and peak memory of the real text300M prior
# ------------------------------------------------------------------------------------------------


def run_real(args: argparse.Namespace, device: torch.device, tmp: str, checkpointing: bool) -> dict:
    cfg = model_config(
        "shape_e_tiny",
        [
            "model.clip_scorer=null",
            f"paths.cache_dir={tmp}",
            f"model.finetune={args.finetune}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
        ],
    )
    with open_dict(cfg):
        cfg.components.prior = TEXT300M_PRIOR
        cfg.components.text_encoder = CLIP_L_TEXT
        cfg.components.renderer = RELEASED_RENDERER
    result: dict[str, Any] = {"checkpointing": checkpointing, "error": None}
    timer = PeakTimer(device)
    model = fit = None
    try:
        start = time.perf_counter()
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            model = instantiate(cfg)
        result["build_s"] = time.perf_counter() - start
        result["prior_params"] = sum(p.numel() for p in model.prior.parameters())
        result["trained"] = sum(p.numel() for _, p in model.trainable_parameters())
        data = FixedLatents(max(2, args.batch), model.latent_shape)
        loader = DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0)
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
        result["precision"] = precision
        fit = trainer(args.warmup + args.steps, device, precision, [timer], tmp)
        fit.fit(model, train_dataloaders=loader)
    except torch.cuda.OutOfMemoryError as err:
        result["error"] = f"OOM ({str(err).splitlines()[0][:120]})"
    result["times"] = timer.times[args.warmup :]
    result["peak"] = timer.peak
    del model, fit
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def bench_real(args: argparse.Namespace, device: torch.device, tmp: str) -> None:
    results = [run_real(args, device, tmp, c) for c in (False, True)]
    first = results[0]
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
        f"text300M prior, random weights ({first.get('prior_params', 0) / 1e6:.0f} M params, "
        f"{first.get('trained', 0) / 1e6:.1f} M trained, finetune={args.finetune}), "
        f"{first.get('precision')}, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed"
    )
    for r in results:
        label = "with checkpointing   " if r["checkpointing"] else "without checkpointing"
        if r["error"]:
            print(f"{label}: {r['error']}")
            continue
        step = median(r["times"])
        peak = f"{r['peak']:.2f} GiB" if r["peak"] is not None else "n/a (cpu)"
        print(f"{label}: {1 / step:6.2f} steps/s ({step * 1e3:.0f} ms/step), peak {peak}")
    if any(r["error"] for r in results):
        print("ratio: inf")
        return
    print(f"ratio: {median(results[1]['times']) / median(results[0]['times']):.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-size", action="store_true", help="the text300M architecture")
    parser.add_argument("--finetune", choices=("full", "lora"), default="full")
    parser.add_argument(
        "--size",
        choices=("small", "tiny"),
        default="small",
        help="small: tiny latent, 4 x 256-wide layers (default); tiny: the tests' prior",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="timed steps: 30 / 10")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps: 5 / 3")
    parser.add_argument("--threads", type=int, default=all_cores())
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cpu / cuda)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (10 if args.real_size else 30)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.real_size else 5)
    device = torch.device(args.device or ("cuda" if args.real_size else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("shape_e_step.py: --real-size / --device cuda needs a CUDA GPU")
    torch.set_num_threads(args.threads)
    quiet()
    with tempfile.TemporaryDirectory(prefix="shape_e_step-") as tmp:
        (bench_real if args.real_size else bench_tiny)(args, device, tmp)


if __name__ == "__main__":
    main()
