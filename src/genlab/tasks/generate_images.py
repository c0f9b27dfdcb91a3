"""``python inference.py task=generate_images lora_path=<run> prompt="..."``: images from a DreamBooth LoRA.

``lora_path`` is a training run directory (``logs/train/runs/<run>``), a LoRA file in it or
anywhere (``pytorch_lora_weights.safetensors``, a kohya/A1111 ``.safetensors``, genlab's
``model.safetensors`` or a ``.ckpt``), or null for the base model without LoRA. When a run's
``.hydra/config.yaml`` is found (in the folder, or beside / one level above the file), the
model is rebuilt from its ``model`` config, so ``model.tiny`` / ``model.pretrained``, the LoRA
rank and targets match what was trained; ``model.*`` overrides on this command line still
apply. Otherwise the command line's ``model=`` is built.

Image ``i`` of every prompt starts from the noise of seed ``seed + i``: the same seed gives the
same pixels, and different prompts (or ``lora_scale`` values, or the base model) are compared
on the same noise. Writes ``<stem>_XX.png`` and ``grid.png`` to ``<run>/samples/``; with
``metrics=true``, DINO / CLIP-I / CLIP-T against the reference photos (``reference_dir``, or
the training run's held-out photos) to ``<run>/metrics.json`` and, per prompt,
``<run>/metrics.csv``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from genlab.metrics.fidelity_report import (
    fidelity_values,
    write_fidelity_csv,
    write_fidelity_json,
)
from genlab.samples import Sample, write_samples
from genlab.tasks.generate import prompts_of
from genlab.tasks.model_loading import model_overrides

log = logging.getLogger(__name__)

#: ``task.scheduler`` names: the diffusers class (and options) built from the model's
#: noise-scheduler config, so betas and prediction type stay the trained ones.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm": ("diffusers.DPMSolverMultistepScheduler", {}),
    "dpm_karras": ("diffusers.DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("diffusers.DDIMScheduler", {}),
    "ddpm": ("diffusers.DDPMScheduler", {}),
    "euler": ("diffusers.EulerDiscreteScheduler", {}),
    "euler_a": ("diffusers.EulerAncestralDiscreteScheduler", {}),
    "heun": ("diffusers.HeunDiscreteScheduler", {}),
    "lms": ("diffusers.LMSDiscreteScheduler", {}),
    "pndm": ("diffusers.PNDMScheduler", {}),
    "unipc": ("diffusers.UniPCMultistepScheduler", {}),
}
#: Looked for, in this order, when ``lora_path`` is a folder.
LORA_FILES = (
    "pytorch_lora_weights.safetensors",
    "model.safetensors",
    "lora_kohya.safetensors",
    "checkpoints/last.ckpt",
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------ the LoRA source


@dataclass(frozen=True)
class LoRASource:
    """The weights file to load (None: the base model) and the training run it came from."""

    weights: Path | None
    run_dir: Path | None = None
    run_config: DictConfig | None = None


def _run_of(*folders: Path) -> tuple[Path | None, DictConfig | None]:
    for folder in folders:
        cfg_file = folder / ".hydra" / "config.yaml"
        if cfg_file.is_file():
            return folder, OmegaConf.load(cfg_file)
    return None, None


def resolve_lora_path(spec: str | Path | None) -> LoRASource:
    """Find the weights and the training run of ``lora_path`` (see the module docstring)."""
    if spec is None or str(spec) == "":
        return LoRASource(None)
    path = Path(str(spec)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"lora_path={spec}: no such file or folder")
    if path.is_dir():
        found = next((path / name for name in LORA_FILES if (path / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"lora_path={spec}: a folder without LoRA weights (looked for "
                f"{', '.join(LORA_FILES)})"
            )
        run_dir, run_cfg = _run_of(path)
        return LoRASource(found, run_dir, run_cfg)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"lora_path={spec}: expected a .safetensors or .ckpt file, or a folder")
    run_dir, run_cfg = _run_of(path.parent, path.parent.parent)
    return LoRASource(path, run_dir, run_cfg)


def load_lora(model: Any, path: Path) -> None:
    """Copy the LoRA weights of ``path`` into ``model``'s adapters.

    diffusers (``pytorch_lora_weights.safetensors``) and kohya/A1111 files go through the
    module's :meth:`~genlab.models.lora_sd.LoRADreamBooth.load_lora_weights`; genlab's own
    ``model.safetensors`` and Lightning checkpoints through its ``load_state_dict``.
    """
    from genlab.models.base import load_weights
    from genlab.models.lora_sd.lora import is_lora_file_state

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
            if is_lora_file_state(dict.fromkeys(keys)):
                counts = model.load_lora_weights(path)
                log.info("LoRA weights of %s loaded: %s tensors", path, counts)
                return
        load_weights(model, path)
    except Exception as err:
        raise _naming(err, f"lora_path={path}") from err
    log.info("LoRA weights of %s loaded", path)


def _naming(err: Exception, prefix: str) -> Exception:
    """``err`` again (same type where it can be rebuilt from one message), prefixed."""
    message = f"{prefix}: {err}"
    try:
        return type(err)(message)
    except Exception:  # noqa: BLE001 - exception types whose constructor takes other arguments
        return RuntimeError(message)


# ------------------------------------------------------------------------------ configs


def _group_chosen(group: str) -> bool:
    if not HydraConfig.initialized():
        return False
    return any(o.lstrip("+~").startswith(f"{group}=") for o in HydraConfig.get().overrides.task)


def model_root(cfg: DictConfig, source: LoRASource) -> DictConfig:
    """The config whose ``model`` is built: the training run's (+ this command line's
    ``model.*`` overrides) when there is one, else this command line's."""
    if source.run_config is None:
        if source.weights is not None:
            log.warning(
                "no .hydra/config.yaml beside %s: building the model from this command line's "
                "config (model=..., its LoRA rank and targets must match the file)",
                source.weights,
            )
        return cfg
    dotlist = [o.lstrip("+") for o in model_overrides() if "=" in o]
    log.info("model config from the training run %s", source.run_dir)
    return OmegaConf.merge(source.run_config, OmegaConf.from_dotlist(dotlist))


def metrics_node(cfg: DictConfig, root: DictConfig) -> DictConfig:
    """The scorer config: a ``model/metrics=...`` choice on this command line, else the
    built model config's ``model.metrics``, else this command line's."""
    chosen = cfg.model.get("metrics") if _group_chosen("model/metrics") else None
    node = chosen if chosen is not None else root.model.get("metrics")
    if node is None:
        node = cfg.model.get("metrics")
    if node is None or (isinstance(node, Mapping) and "_target_" not in node):
        raise ValueError(
            "metrics=true needs a scorer and the model config has none: add "
            "model/metrics=subject_fidelity (DINO + CLIP weights, downloaded) or "
            "model/metrics=subject_fidelity_tiny (random weights, offline)"
        )
    return node


def build_scheduler(spec: Any, model: Any) -> Any:
    """A sampling scheduler from ``task.scheduler``, built from the model's noise-scheduler
    config: None (the model's ``sample_scheduler``), a name of :data:`SCHEDULERS`, a
    ``_partial_`` config such as ``{_target_: diffusers.DDIMScheduler.from_config,
    _partial_: true}`` (called with that config; Hydra hands it over as a callable), or a
    ``_target_`` mapping naming a scheduler class (``from_config`` with the other keys)."""
    if spec is None:
        return None
    config = model.noise_scheduler.config
    if isinstance(spec, str):
        if spec not in SCHEDULERS:
            raise ValueError(f"task.scheduler={spec!r}: one of {sorted(SCHEDULERS)} or null")
        target, options = SCHEDULERS[spec]
        return get_object(target).from_config(config, **options)
    if isinstance(spec, Mapping) and "_target_" in spec:
        spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec
        options = {k: v for k, v in spec.items() if k not in ("_target_", "_partial_")}
        factory = get_object(str(spec["_target_"]))
        build = factory.from_config if isinstance(factory, type) else factory
        return build(config, **options)
    if hasattr(spec, "set_timesteps"):  # a scheduler Hydra built from a full _target_ config
        return spec
    if callable(spec):
        return spec(config)
    raise ValueError(
        f"task.scheduler: a name of {sorted(SCHEDULERS)}, a _target_ config or null, not {spec!r}"
    )


# ------------------------------------------------------------------------------ references


def reference_photos(cfg: DictConfig, source: LoRASource) -> tuple[list[Path], str]:
    """The photos the images are scored against, and where they came from: ``reference_dir``,
    else the held-out (val) photos of the training run (its ``data_split.json``)."""
    from genlab.data.dreambooth import list_images

    if cfg.get("reference_dir"):
        folder = Path(str(cfg.reference_dir)).expanduser()
        return list_images(folder, "reference_dir"), str(folder)
    hint = "pass reference_dir=<folder of photos of the object>"
    if source.run_dir is None or source.run_config is None:
        raise ValueError(f"metrics=true: no reference photos: {hint}")
    split_file = source.run_dir / "data_split.json"
    instance_dir = OmegaConf.select(source.run_config, "data.instance_dir", default=None)
    if not split_file.is_file() or instance_dir is None:
        raise ValueError(
            f"metrics=true: {source.run_dir} has no data_split.json / data.instance_dir: {hint}"
        )
    folder = Path(str(instance_dir)).expanduser()
    names = json.loads(split_file.read_text(encoding="utf-8")).get("val") or []
    missing = [n for n in names if not (folder / n).is_file()]
    if not names or missing:
        raise ValueError(
            f"metrics=true: the run's held-out photos are not in {folder} "
            f"({len(missing)} of {len(names)} missing): {hint}"
        )
    return [folder / n for n in names], f"{folder} (held-out split of {source.run_dir})"


# ------------------------------------------------------------------------------ the task


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"task.dtype={name!r}: auto or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def generate_images(
    cfg: DictConfig,
    scheduler: str | Mapping[str, Any] | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    lora_scale: float = 1.0,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> list[Path]:
    """Generate ``num_images`` images per prompt; returns the written files (PNGs, grid,
    then ``metrics.json`` and ``metrics.csv`` with ``metrics=true``).

    ``steps``, ``guidance_scale`` and ``negative_prompt`` default to the model's
    ``validation`` settings, ``height``/``width`` to ``model.resolution``, ``scheduler`` to
    ``model.sample_scheduler``. ``lora_scale`` multiplies every LoRA update (0: the base
    model's images, exactly).
    """
    from genlab.models.lora_sd import LoRADreamBooth

    prompts = prompts_of(cfg)
    if prompts == [""] and cfg.get("prompt") is None:
        raise ValueError('no prompt: pass prompt="a photo of sksToy toy" or prompts=[...]')
    n = int(cfg.get("num_images") or 0)
    if n < 1:
        raise ValueError(f"num_images must be >= 1, got {cfg.get('num_images')}")
    seed = int(cfg.get("seed") or 0)
    want_metrics = bool(cfg.get("metrics"))
    if cfg.get("ckpt_path"):
        raise ValueError("task=generate_images reads lora_path=..., not ckpt_path")
    source = resolve_lora_path(cfg.get("lora_path"))
    root = model_root(cfg, source)
    scorer_cfg = metrics_node(cfg, root) if want_metrics else None
    references, reference_origin = reference_photos(cfg, source) if want_metrics else ([], "")

    built = copy.deepcopy(root)
    with open_dict(built):
        built.model.metrics = None  # the scorer is built below, only when asked for
    model = instantiate(built.model)
    if not isinstance(model, LoRADreamBooth):
        raise TypeError(
            "task=generate_images needs a DreamBooth LoRA model (model=lora_sd, lora_sdxl or "
            f"their _tiny variants), got {type(model).__name__}"
        )
    if source.weights is not None:
        load_lora(model, source.weights)
    elif float(lora_scale) != 1.0:
        log.warning("lora_path=null: the base model, lora_scale=%s has no effect", lora_scale)
    target = _device(device)
    model.to(device=target, dtype=_dtype(dtype, target)).eval()
    sampler = build_scheduler(scheduler, model)
    if sampler is None:
        pipe = model.pipeline()
    else:
        from genlab.models.lora_sd.components import assemble_pipeline

        pipe = assemble_pipeline(model.components, sampler)

    context = model.adapters_disabled() if source.weights is None else model.lora_scaled(lora_scale)
    samples: list[Sample] = []
    with context, torch.no_grad():
        for prompt in prompts:
            generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
            images = model.generate(
                [prompt],
                generators,
                n,
                steps=steps,
                guidance=guidance_scale,
                pipe=pipe,
                negative_prompt=(
                    model.validation["negative_prompt"]
                    if negative_prompt is None
                    else negative_prompt
                ),
                height=height,
                width=width,
            )
            samples += [Sample(prompt, i, image=image) for i, image in enumerate(images)]
    out = Path(cfg.paths.output_dir)
    written, grid = write_samples(samples, out / "samples")
    files = [w.preview_path for w in written] + [grid]
    log.info(
        "wrote %d image(s) for %d prompt(s) (%s) to %s",
        len(samples),
        len(prompts),
        f"LoRA {source.weights}, scale {lora_scale}" if source.weights else "base model",
        grid.parent,
    )
    if not want_metrics:
        return files

    scorer = instantiate(scorer_cfg)
    if isinstance(scorer, torch.nn.Module):
        scorer.to(target)
    with torch.no_grad():
        values = fidelity_values(
            scorer(
                images=[s.image for s in samples],
                prompts=[s.prompt for s in samples],
                references=list(references),
            )
        )
    extra = {
        "lora_path": str(source.weights) if source.weights else None,
        "lora_scale": float(lora_scale) if source.weights else None,
        "references": reference_origin,
        "seed": seed,
        "num_images_per_prompt": n,
        "steps": int(steps or model.validation["steps"]),
        "guidance_scale": float(
            model.validation["guidance"] if guidance_scale is None else guidance_scale
        ),
        "scheduler": type(pipe.scheduler).__name__,
    }
    files.append(write_fidelity_json(out / "metrics.json", values, extra=extra))
    files.append(write_fidelity_csv(out / "metrics.csv", values))
    log.info(
        "against %d reference photo(s): %s (%s)",
        len(references),
        ", ".join(f"{k} {v:.4f}" for k, v in values.means.items()),
        out / "metrics.json",
    )
    return files
