"""Training methods: sibling modules with the same small set of functions, no base class (`textual_inversion`,
`lora`). `attach` puts the configured method's trainable parts into a base model, for every text encoder its family
has."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from sdtune.config import TrainConfig
from sdtune.methods import lora, textual_inversion
from sdtune.models import BaseModel

logger = logging.getLogger(__name__)


@dataclass
class Trainables:
    """The trainable parameters, in the optimizer's groups: the UNet's and the text encoders' LoRA factors, and the
    placeholder vectors (one `[n, width]` tensor per text encoder of the family, in the family's order)."""

    unet: list[torch.nn.Parameter] = field(default_factory=list)
    text_encoder: list[torch.nn.Parameter] = field(default_factory=list)
    embedding: list[torch.nn.Parameter] = field(default_factory=list)

    def groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Group name -> parameters (what the optimizer and the resumable state are keyed by)."""
        return {"unet": self.unet, "text_encoder": self.text_encoder, "embedding": self.embedding}

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every trainable parameter."""
        return [param for group in self.groups().values() for param in group]

    @property
    def text_path_trains(self) -> bool:
        """True when gradients must flow through the text encoders (TI vectors or text-encoder LoRA)."""
        return bool(self.embedding or self.text_encoder)


def attach(config: TrainConfig, base: BaseModel) -> Trainables:
    """Injects the LoRA layers and/or adds the placeholder to every text encoder (TI); returns the new parameters.

    The LoRA goes in first: peft marks every non-LoRA parameter of a model it wraps as frozen, which would freeze
    placeholder vectors attached before it.
    """
    trainables = Trainables()
    if config.uses_lora:
        plan = lora.plan_for(config, base.family, base.adaptable())
        for component, targets in plan.targets.items():
            if targets:
                params = lora.inject(base.adaptable()[component], targets)
                (trainables.unet if component == "unet" else trainables.text_encoder).extend(params)
        if plan.initial is not None:
            lora.load_factors(base.family, base.adaptable(), plan.initial)
    if config.uses_ti:
        for spec in base.family.text_encoders:
            tokenizer, encoder = base.tokenizers[spec.tokenizer], base.text_encoders[spec.component]
            vectors = textual_inversion.attach(
                tokenizer, encoder, config.placeholder_token, config.num_vectors, config.init_word
            )
            trainables.embedding.append(vectors)
    return trainables


HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def configure_modules(config: TrainConfig, base: BaseModel, trainables: Trainables) -> None:
    """How the base's modules run during training: frozen weights in half precision with mixed precision (a VAE
    that overflows in fp16, SDXL's, stays float32 unless the config names another one), gradient checkpointing,
    xformers attention, TF32, torch.compile."""
    if config.mixed_precision in HALF_DTYPES:
        keep_vae = config.no_half_vae or (
            config.mixed_precision == "fp16" and base.family.vae_overflows_in_fp16 and not config.vae
        )
        store_frozen_in_half(base, trainables, HALF_DTYPES[config.mixed_precision], keep_vae)
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    if config.xformers:
        base.unet.enable_xformers_memory_efficient_attention()
    if config.tf32:  # process-wide: every CUDA matmul and convolution of this run
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        logger.warning("tf32: true: CUDA matmuls and convolutions run in TF32 (about 1e-3 relative error)")
    if config.torch_compile:  # in place: the module, its parameters and state-dict keys stay what they are
        base.unet.compile()


def store_frozen_in_half(base: BaseModel, trainables: Trainables, dtype: torch.dtype, keep_vae_float32: bool) -> None:
    """Mixed precision: frozen weights in `dtype` (half the memory), trainable parameters back in float32. The text
    encoders stay float32 while anything in them trains (TI vectors, text-encoder LoRA), the VAE with
    `keep_vae_float32` (`no_half_vae`)."""
    base.unet.to(dtype)
    if not trainables.text_path_trains:
        for encoder in base.text_encoders.values():
            encoder.to(dtype)
    if not keep_vae_float32:
        base.vae.to(dtype)
    with torch.no_grad():
        for param in trainables.parameters():
            param.data = param.data.float()


def optimizer(config: TrainConfig, trainables: Trainables) -> torch.optim.Optimizer:
    """The configured optimizer over one parameter group per trainable part, each with its learning rate."""
    rates = config.group_learning_rates()
    groups = [{"params": ps, "lr": rates[name], "name": name} for name, ps in trainables.groups().items() if ps]
    if config.optimizer_type == "adamw8bit":
        import bitsandbytes  # optional package, checked by preflight

        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=config.adam_weight_decay)
    if config.optimizer_type == "prodigy":
        import prodigyopt  # optional package, checked by preflight

        return prodigyopt.Prodigy(groups, weight_decay=config.adam_weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.adam_weight_decay)
