"""Data-parallel scaling of voxel VAE-GAN training: 1 vs 2 CPU processes (DDP, gloo), same run.

    python bench/ddp_scaling.py [--steps 30] [--warmup 5] [--batch 8] [--repeats 2]
    python bench/ddp_scaling.py --single-gpu-real-size [--steps 50] [--batch 32] [--bus-gbs 50]

Default: the tiny voxel VAE-GAN of the tests (16^3, 8 channels) trains ``warmup + steps`` steps of
``--batch`` samples per process, once in one process (all cores) and once as 2 DDP processes
(Lightning gives each half of the cores), each in a fresh subprocess, ``--repeats`` times
alternately; the best run of each counts. Prints both throughputs (samples/s over all
processes, from the median step time, so that a stall caused by other load on a shared machine
does not count) and, last, ``ratio: <time per sample with 2 processes / with 1>``:
lower is better, 0.5 is perfect scaling (twice the samples per second), 1.0 means the second
process bought nothing (on a CPU both share the same cores, so expect little gain: the win of DDP
is more devices, not more processes on one).

``--single-gpu-real-size``: one GPU's training throughput of the VAE-GAN at its real (ModelIT)
sizes, read from conf/model/voxel_vaegan.yaml and the batch of conf/data/synthetic_shapes.yaml,
bf16-mixed, random occupancy grids (no downloads, no data set). Also prints the gradient volume
each DDP step all-reduces and, last, an estimated ``ratio`` for 2 GPUs: (step + all-reduce at
``--bus-gbs`` GB/s, not overlapped with backward) / (2 x step), an upper bound on the time per
sample relative to one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from _common import RandomGrids, StepClock, bench_trainer, median
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
# the tests' tiny sizes (tests/helpers.py TINY_VOXEL)
TINY = [
    "model.voxel_size=16",
    "model.generator.hidden_channels=8",
    "model.generator.latent_dim=16",
    "model.generator.num_encoder_layers=3",
    "model.generator.num_decoder_layers=3",
    "model.discriminator.hidden_channels=8",
    "model.discriminator.num_layers=3",
    "model.text_encoder.embed_dim=32",
]


def build_model(overrides: list[str]) -> tuple[pl.LightningModule, dict]:
    """The VAE-GAN exactly as ``python train.py <overrides>`` builds it, and the composed config."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    model = instantiate(cfg.model)
    sizes = {
        "voxel_size": cfg.model.voxel_size,
        "latent_dim": cfg.model.generator.latent_dim,
        "hidden": cfg.model.generator.hidden_channels,
        "layers": cfg.model.generator.num_encoder_layers,
        "embed_dim": cfg.model.text_encoder.embed_dim,
        "batch": cfg.data.batch_size,
    }
    return model, OmegaConf.to_container(OmegaConf.create(sizes))


def train_steps(
    model: pl.LightningModule,
    voxel_size: int,
    batch: int,
    steps: int,
    warmup: int,
    **trainer_kwargs,
) -> tuple[pl.Trainer, dict]:
    """Train warmup + steps batches per process; times of the last ``steps`` on this rank."""
    devices = trainer_kwargs.get("devices", 1)
    per_rank = batch * (warmup + steps)
    loader = DataLoader(RandomGrids(per_rank * devices, voxel_size), batch_size=batch)
    clock = StepClock()
    trainer = bench_trainer([clock], max_epochs=1, **trainer_kwargs)
    trainer.fit(model, train_dataloaders=loader)
    measured = clock.ends[-1] - clock.starts[warmup]
    step = median(clock.durations(skip=warmup))
    result = {
        "world_size": trainer.world_size,
        "threads": torch.get_num_threads(),
        "steps": len(clock.ends) - warmup,
        "seconds": measured,
        # from the median step: a stall of a shared machine does not count
        "samples_per_s": batch * trainer.world_size / step,
        "mean_samples_per_s": batch * trainer.world_size * (len(clock.ends) - warmup) / measured,
        "median_step_ms": 1e3 * step,
    }
    return trainer, result


def worker(args: argparse.Namespace) -> None:
    """One measurement: ``--devices`` CPU processes (DDP when 2); rank 0 writes ``--out``."""
    from lightning.pytorch.strategies import DDPStrategy

    pl.seed_everything(0, workers=True, verbose=False)
    model, sizes = build_model(TINY)
    kwargs: dict = {"accelerator": "cpu", "devices": args.devices}
    if args.devices > 1:
        # a GAN step leaves one network without gradients, as in conf/trainer/ddp.yaml
        kwargs["strategy"] = DDPStrategy(find_unused_parameters=True)
    trainer, result = train_steps(
        model, sizes["voxel_size"], args.batch, args.steps, args.warmup, **kwargs
    )
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps({**result, "sizes": sizes}))


def measure(devices: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"--devices={devices}",
        f"--out={out}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch={args.batch}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{devices}-process run failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def cpu_scaling(args: argparse.Namespace) -> None:
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # alternated, so a burst of other load hits both alike
            for devices in (1, 2):
                runs[devices].append(measure(devices, args, Path(tmp) / f"{devices}_{i}.json"))
    one, two = (max(runs[d], key=lambda r: r["samples_per_s"]) for d in (1, 2))
    s = one["sizes"]
    print(
        f"tiny voxel VAE-GAN {s['voxel_size']}^3 (hidden {s['hidden']}, latent {s['latent_dim']}), "
        f"batch {args.batch} per process, {one['steps']} steps after {args.warmup} warm-up, "
        f"{os.cpu_count()} CPU cores, best of {args.repeats} alternated runs"
    )
    for name, r in (("1 process ", one), ("2 processes", two)):
        print(
            f"{name} ({r['threads']} thread(s) each): {r['samples_per_s']:8.1f} samples/s "
            f"({r['median_step_ms']:.1f} ms/step median; {r['mean_samples_per_s']:.1f} samples/s "
            "over the whole run)"
        )
    # time per sample = 1 / throughput
    print(f"ratio: {one['samples_per_s'] / two['samples_per_s']:.3f}")


def single_gpu_real_size(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--single-gpu-real-size needs a CUDA GPU")
    pl.seed_everything(0, workers=True, verbose=False)
    model, sizes = build_model(["trainer=gpu"])
    batch = args.batch if args.batch_given else sizes["batch"]
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _, r = train_steps(
        model,
        sizes["voxel_size"],
        batch,
        args.steps,
        args.warmup,
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
    )
    grad_mb = params * 4 / 1e6  # DDP all-reduces fp32 gradients of every trainable parameter
    comm_ms = 2 * (2 - 1) / 2 * grad_mb / 1e3 / args.bus_gbs * 1e3  # ring all-reduce, 2 GPUs
    step_ms = 1e3 * r["seconds"] / r["steps"]
    print(
        f"{torch.cuda.get_device_name()}: voxel VAE-GAN at conf sizes {sizes['voxel_size']}^3 "
        f"(hidden {sizes['hidden']}, latent {sizes['latent_dim']}, {sizes['layers']} layers, "
        f"text {sizes['embed_dim']}-d), batch {batch}, bf16-mixed, {params / 1e6:.2f} M trainable "
        f"parameters"
    )
    print(
        f"1 GPU: {r['mean_samples_per_s']:.1f} samples/s ({step_ms:.2f} ms/step mean, "
        f"{r['median_step_ms']:.2f} median, {r['steps']} steps after {args.warmup} warm-up); "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    )
    print(
        f"DDP all-reduce per step: {grad_mb:.1f} MB of gradients; at {args.bus_gbs:g} GB/s bus "
        f"bandwidth {comm_ms:.2f} ms for 2 GPUs (DDP overlaps most of it with backward)"
    )
    print(f"ratio: {(step_ms + comm_ms) / (2 * step_ms):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="measured steps per process")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    p.add_argument("--batch", type=int, default=None, help="samples per process and step")
    p.add_argument("--repeats", type=int, default=2, help="runs of each, the best one counts")
    p.add_argument("--single-gpu-real-size", action="store_true")
    p.add_argument("--bus-gbs", type=float, default=50.0, help="GB/s for the all-reduce estimate")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch_given = args.batch is not None
    if args.batch is None:
        args.batch = 8
    if args.worker:
        worker(args)
    elif args.single_gpu_real_size:
        single_gpu_real_size(args)
    else:
        cpu_scaling(args)


if __name__ == "__main__":
    main()
