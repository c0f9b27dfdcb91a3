"""DreamBooth LoRA on Stable Diffusion 1.x/2.x and SDXL (``model=lora_sd``, ``model=lora_sdxl``)."""

from genlab.models.lora_sd.components import (
    Components,
    assemble_pipeline,
    build_tiny_components,
    clip_bpe_tokenizer,
    detect_architecture,
    load_components,
)
from genlab.models.lora_sd.lora import LoRASettings
from genlab.models.lora_sd.module import (
    LoRADreamBooth,
    adamw_8bit,
    combine_prior_loss,
    min_snr_weights,
    sdxl_time_ids,
)

__all__ = [
    "Components",
    "LoRADreamBooth",
    "LoRASettings",
    "adamw_8bit",
    "assemble_pipeline",
    "build_tiny_components",
    "clip_bpe_tokenizer",
    "combine_prior_loss",
    "detect_architecture",
    "load_components",
    "min_snr_weights",
    "sdxl_time_ids",
]
