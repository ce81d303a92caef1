"""Generation: a base model's diffusers pipeline with LoRAs and embeddings stacked on it by name, each with its own
weights, behind the compatibility gates of `sdtune.compat`; and the one way sdtune draws images from seeds
(`generate_images`), used by `AdapterPipeline.generate`, `sdtune generate` and the sample grids of training alike.

Weights are applied by diffusers' own loaders (`load_lora_weights` + `set_adapters`, `load_textual_inversion`), so a
stack behaves here as it does in any diffusers script: `W + a*dA + b*dB` for LoRAs at weights a and b. Only builds
pipelines and generates; it never imports training code.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtune import atomic, compat, export, formats
from sdtune.errors import SdtuneError
from sdtune.families import Family
from sdtune.models import (
    BaseModel,
    TextConditioning,
    encode_text,
    file_sha256,
    load_base_model,
    tokenizer_fingerprint,
    without_safety_checker,
)

# sampler name -> (diffusers scheduler class, extra config, A1111's name for the infotext)
SAMPLERS = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}
# The limits of a generation's settings, checked before anything is allocated (`setting_problems`):
SIZE_MULTIPLE = 8  # every SD family's VAE works on 8x8-pixel blocks; diffusers' pipelines refuse other sizes
MAX_SIDE = 8192  # 8x SDXL's native 1024 (16x SD1's 512)
MAX_PIXELS = 4096 * 4096  # 16,777,216: 16x SDXL's native 1024x1024; one VAE decode of it needs tens of GB already
MAX_STEPS = 1000  # the diffusion timesteps SD models are trained on; more sampler steps only repeat timesteps
MAX_SEED = 2**64 - 1  # torch generators take unsigned 64-bit seeds (and negative ones down to -2**63, wrapped)
MIN_SEED = -(2**63)
logger = logging.getLogger(__name__)


class SettingError(SdtuneError, ValueError):
    """A generation setting (size, steps, guidance, seed) that cannot be drawn."""


class NonFiniteImageError(SdtuneError):
    """Images whose decoded pixels are NaN or infinite: saved, they would be black (or flat) with nothing to say why.

    Attributes:
        images: One entry per prompt of the call: the image, or None for the non-finite ones and the prompts not
            drawn after them, so a caller can keep what came out right.
    """

    def __init__(self, labels: list[str], images: list, note: str = ""):
        self.labels, self.images = labels, images
        super().__init__(
            f"{'; '.join(labels)}: the decoded pixels are NaN or infinite (saved, the image would be black), so "
            f"nothing was saved for {'it' if len(labels) == 1 else 'them'}.{note} Likely causes: a LoRA or embedding "
            "holding NaN or huge values, or applied at too high a weight (try without it, or a lower weight); a base "
            "checkpoint with broken weights; a float16 VAE that overflowed (decode in float32: sdtune loads "
            "float32 unless the pipeline was cast); a guidance scale far too high."
        )


def setting_problems(width=None, height=None, steps=None, guidance=None, seeds=()) -> list[str]:
    """What is wrong with generation settings (None: not checked), one message each with the value and the fix.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        steps: Sampler steps.
        guidance: Classifier-free guidance scale.
        seeds: Seeds (each must fit a torch generator: -2**63 .. 2**64-1; `sdtune generate` takes 0 .. 2**64-1).

    Returns:
        The problems; empty when the settings can be drawn.
    """
    problems = []
    for name, side in (("width", width), ("height", height)):
        if side is not None and not 0 < side <= MAX_SIDE:
            problems.append(f"`{name}` {side} is outside 8..{MAX_SIDE} pixels; give a multiple of 8 in that range")
        elif side is not None and side % SIZE_MULTIPLE:
            lower = max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE)
            problems.append(
                f"`{name}` {side} is not a multiple of {SIZE_MULTIPLE} (the VAE works on 8x8-pixel blocks); "
                f"use {lower} or {lower + SIZE_MULTIPLE}"
            )
    if not problems and width is not None and height is not None and width * height > MAX_PIXELS:
        problems.append(
            f"{width}x{height} is {width * height:,} pixels, over the {MAX_PIXELS:,} (4096x4096) sdtune draws at "
            "once (one VAE decode alone would need tens of GB); generate smaller and upscale"
        )
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        problems.append(f"`steps` {steps} is outside 1..{MAX_STEPS} (the model's diffusion timesteps); 20-50 is usual")
    if guidance is not None and not math.isfinite(guidance):
        problems.append(f"`guidance` {guidance} is not a finite number; 7.5 is usual (1 turns guidance off)")
    bad = [seed for seed in seeds if not MIN_SEED <= seed <= MAX_SEED]
    if bad:
        problems.append(f"seed {bad[0]} is outside -2**63..2**64-1 (what a torch generator takes); use 0..{MAX_SEED}")
    return problems


def make_scheduler(sampler: str, scheduler_config: dict):
    """The diffusers scheduler for a sampler name (see `SAMPLERS`), configured from the base model's scheduler."""
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    class_name, extra, _ = SAMPLERS[sampler]
    return getattr(diffusers, class_name).from_config(scheduler_config, **extra)


def pipeline_from_components(family: Family, components: Mapping, scheduler_config: dict, sampler: str = "dpmpp_2m"):
    """The family's diffusers pipeline over already loaded (possibly adapted) components (tokenizers, text encoders,
    `unet`, `vae` by pipeline attribute name: `BaseModel.components`), with the chosen sampler."""
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline_class)
    names = ["unet", "vae", *(name for spec in family.text_encoders for name in (spec.tokenizer, spec.component))]
    pipe = pipeline_class(
        **{name: components[name] for name in names},
        scheduler=make_scheduler(sampler, scheduler_config),
        **without_safety_checker(pipeline_class),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_arguments(pipe, family: Family, prompts: list[str], negative_prompt: str, clip_skip: int) -> dict:
    """The prompt arguments of a pipeline call: the text itself, or embeddings computed as training computes them
    (`models.encode_text`; embedding tokens expanded first, as the pipeline would) with `clip_skip` > 1
    (kohya/A1111 counting) and for families with a pooled embedding (SDXL: the pooled state at the first end-of-text
    token, which the pipeline's own argmax pooling misses once a placeholder token is added). An empty negative
    prompt is zeros where the pipeline's config says so (SDXL's `force_zeros_for_empty_prompt`), as there."""
    negative = [negative_prompt] * len(prompts) if negative_prompt else None
    if clip_skip == 1 and not family.time_ids:
        return {"prompt": prompts, "negative_prompt": negative}
    tokenizer = getattr(pipe, family.text_encoders[0].tokenizer)  # every tokenizer of a family holds the same tokens
    device = getattr(pipe, family.text_encoders[0].component).device
    text = encode_text(family, pipe.components, pipe.maybe_convert_prompt(prompts, tokenizer), device, clip_skip)
    if negative is None and pipe.config.get("force_zeros_for_empty_prompt", False):
        pooled = None if text.pooled is None else torch.zeros_like(text.pooled)
        unconditional = TextConditioning(torch.zeros_like(text.states), pooled)
    else:
        texts = pipe.maybe_convert_prompt(negative or [""] * len(prompts), tokenizer)
        unconditional = encode_text(family, pipe.components, texts, device, clip_skip)
    arguments = {"prompt_embeds": text.states, "negative_prompt_embeds": unconditional.states}
    if text.pooled is not None:
        arguments.update(pooled_prompt_embeds=text.pooled, negative_pooled_prompt_embeds=unconditional.pooled)
    return arguments


def generate_images(
    pipe,
    family: Family,
    prompts: list[str],
    seeds: list[int],
    size: tuple[int, int],
    steps: int = 20,
    guidance: float = 7.5,
    negative_prompt: str = "",
    clip_skip: int = 1,
    batch_size: int = 16,
    check_finite: bool = False,
    pipeline_encodes: bool = False,
) -> list[Image.Image]:
    """One image per prompt, prompt `i` drawn from `seeds[i]`, `batch_size` prompts per forward pass.

    Every seed seeds its own CPU generator (as ComfyUI and A1111's CPU noise source do), whatever the device and the
    rest of the batch, so a seed names one starting noise on any machine. The only place sdtune draws images.

    Args:
        pipe: A pipeline of `family` (see `pipeline_from_components`).
        family: Its family.
        prompts: The prompts (embedding tokens as registered; LoRA tags already taken out).
        seeds: One seed per prompt.
        size: (width, height) in pixels.
        steps: Sampler steps.
        guidance: Classifier-free guidance scale.
        negative_prompt: The negative prompt of every image.
        clip_skip: Text-encoder layer counted from the end, as kohya and A1111 count (1 = the family's layer).
        batch_size: Prompts per forward pass.
        check_finite: Refuse images whose decoded pixels are NaN or infinite (black in uint8). Off for training's
            sample grids: only the main process draws them, an error there would leave the others waiting.
        pipeline_encodes: The pipeline encodes the prompts itself (`clip_skip` 1; benchmarks of its conventions).

    Raises:
        SettingError: A size, step count, guidance or seed that cannot be drawn (before anything runs).
        NonFiniteImageError: With `check_finite`, at the first batch holding such an image (nothing after it is drawn).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    problems = setting_problems(size[0], size[1], steps, guidance, seeds)
    if problems:
        raise SettingError("; ".join(problems))
    settings = {"width": size[0], "height": size[1], "num_inference_steps": steps, "guidance_scale": guidance}
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start : start + batch_size]]
        with torch.no_grad(), _decoder_finiteness(pipe, check_finite) as decoded:
            arguments = _text_arguments(pipe, family, chunk, negative_prompt, clip_skip, pipeline_encodes)
            # "np": the floats diffusers would round to uint8, where a NaN is still visible
            output = pipe(generator=generators, output_type="np", **settings, **arguments)
        bad = _non_finite(output.images, decoded) if check_finite else []
        drawn = pipe.numpy_to_pil(np.nan_to_num(output.images) if bad else output.images)  # as diffusers' "pil"
        if bad:
            labels = [f"prompt {_short(chunk[i])!r} (seed {seeds[start + i]})" for i in bad]
            kept = [None if i in bad else image for i, image in enumerate(drawn)]
            raise NonFiniteImageError(labels, images + kept + [None] * (len(prompts) - start - len(chunk)))
        images += drawn
    return images


def _text_arguments(pipe, family: Family, prompts, negative_prompt: str, clip_skip: int, pipeline_encodes: bool):
    """`prompt_arguments`, or with `pipeline_encodes` the texts themselves for the pipeline to encode (for SDXL the
    two differ only where a placeholder token changes the pipeline's pooling)."""
    if not pipeline_encodes:
        return prompt_arguments(pipe, family, prompts, negative_prompt, clip_skip)
    if clip_skip != 1:
        raise ValueError("pipeline_encodes: the pipeline encodes at clip_skip 1 only")
    return {"prompt": prompts, "negative_prompt": [negative_prompt] * len(prompts) if negative_prompt else None}


@contextlib.contextmanager
def _decoder_finiteness(pipe, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Records, per call of the VAE's decoder, which images of it came out finite. diffusers clamps the decoded
    image to [0, 1] before handing it back, so an infinite pixel would arrive as a plain 0 or 1."""
    calls: list[torch.Tensor] = []
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    if not enabled or not isinstance(decoder, torch.nn.Module):
        yield calls
        return
    hook = decoder.register_forward_hook(lambda module, inputs, out: calls.append(_finite_rows(out)))
    try:
        yield calls
    finally:
        hook.remove()


def _finite_rows(decoded) -> torch.Tensor:
    decoded = getattr(decoded, "sample", decoded)
    return torch.isfinite(decoded).flatten(1).all(dim=1).cpu()


def _non_finite(pixels: np.ndarray, decoded: list[torch.Tensor]) -> list[int]:
    """Indices of the images with a NaN pixel, or whose decoder output held NaN or infinity (decoder calls that do
    not map to images one to one, as with VAE tiling, mark the whole batch when any of them did)."""
    bad = ~np.isfinite(pixels.reshape(len(pixels), -1)).all(axis=1)
    rows = torch.cat(decoded).numpy() if decoded else np.ones(0, dtype=bool)
    if len(rows) == len(pixels):  # one call for the batch, or one per image (VAE slicing)
        bad |= ~rows
    elif not rows.all():
        bad[:] = True
    return [int(i) for i in np.flatnonzero(bad)]


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Adapter:
    """A LoRA or embedding loaded into an `AdapterPipeline`, addressed by `name`."""

    name: str
    kind: str  # "lora" or "embedding"
    path: Path
    short_hash: str  # what A1111 writes as the file's hash in "Lora hashes" / "TI hashes"
    internal_name: str = ""  # the LoRA's adapter name inside diffusers/peft
    components: tuple[str, ...] = ()  # LoRA: the components it adapts
    tokens: tuple[str, ...] = ()  # embedding: the tokens registered for its vectors
    text_encoder_weight: float = 1.0
    unet_weight: float = 1.0
    active: bool = True  # LoRA: applied to every generation (prompt tags activate inactive ones per prompt)
    warnings: list[str] = field(default_factory=list)


def short_hash(path: Path, kind: str) -> str:
    """A1111's short hash: a LoRA `.safetensors` hashes the bytes after its header (the "addnet" hash), anything else
    the whole file; 12 hex digits."""
    if kind == "lora" and path.suffix == ".safetensors":
        return export.a1111_hashes(path.read_bytes())[0][:12]
    return file_sha256(path)[:12]


class AdapterPipeline:
    """A base model's pipeline with LoRAs and embeddings added, re-weighted and removed by name.

    Every artifact passes `compat.require_fit` before it touches the pipeline; a refused or failed load leaves the
    pipeline exactly as it was. With `fuse(True)` the weighted LoRAs are baked into the weights before the next
    generation (generation then costs what the base costs); any change unfuses first.

    Example:
        >>> pipe = AdapterPipeline.from_base("sample_data/world-sd1")
        >>> pipe.add_lora("output/red_star/red_star.safetensors", weight=0.8)
        >>> images = pipe.generate(["a <star> on a purple background"], seeds=[1])
    """

    def __init__(self, base: BaseModel, sampler: str = "dpmpp_2m", device: str | None = None):
        self.base = base
        self.pipe = pipeline_from_components(base.family, base.components, base.scheduler_config, sampler)
        if device:
            self.pipe.to(device)
        self.sampler = sampler
        self.adapters: dict[str, Adapter] = {}
        self._tokenizer_fingerprint = tokenizer_fingerprint(*base.tokenizers.values())  # before embeddings add tokens
        self._lora_components = list(base.adaptable())
        self._counter = itertools.count()
        self._applied: tuple | None = ()  # the LoRA weights last given to diffusers; () = none loaded
        self._fuse_wanted = False
        self._fused = False

    @classmethod
    def from_base(
        cls,
        path: str | Path,
        sampler: str = "dpmpp_2m",
        device: str | None = None,
        config_dir=None,
        prediction_type: str | None = None,
    ):
        """Loads a base model (diffusers folder or single-file checkpoint; `config_dir` and `prediction_type` as
        `models.load_base_model` takes them) and wraps it."""
        return cls(load_base_model(path, config_dir, prediction_type), sampler=sampler, device=device)

    # -- adding, re-weighting, removing ------------------------------------------------------------------------
    def add_lora(
        self,
        path: str | Path,
        name: str | None = None,
        weight: float = 1.0,
        text_encoder_weight: float | None = None,
        unet_weight: float | None = None,
        force: bool = False,
        active: bool = True,
    ) -> Adapter:
        """Loads a LoRA (kohya or diffusers layout, any tool's) under `name` (default: the file stem).

        Args:
            path: The `.safetensors` file (or a diffusers LoRA folder).
            name: How prompts and `set_weight`/`remove` address it.
            weight: Strength for both components; `text_encoder_weight` / `unet_weight` override one of them.
            force: Accept a file made on another checkpoint of the same family (warns).
            active: Apply it to every generation; False loads it for prompt tags (`<lora:name:w>`) only.

        Raises:
            IncompatibleArtifactError: It does not fit this base (the pipeline is unchanged).
            FormatError: Not a LoRA, unreadable, or the name is taken.
        """
        path = Path(path)
        name = name or path.stem
        artifact, warnings = self._checked_artifact(path, "lora", name, force)
        tensors, _ = formats.load_tensors(artifact.path)
        internal = f"sdtune_{next(self._counter)}"
        self._unfuse()
        try:
            self.pipe.load_lora_weights(tensors, adapter_name=internal)
            self._verify_loaded(artifact, internal)
        except Exception:
            self._delete_internal(internal)
            raise
        components = tuple(c for c, names in self.pipe.get_list_adapters().items() if internal in names)
        self.adapters[name] = Adapter(
            name, "lora", artifact.path, short_hash(artifact.path, "lora"), internal, components,
            text_encoder_weight=weight if text_encoder_weight is None else text_encoder_weight,
            unet_weight=weight if unet_weight is None else unet_weight,
            active=active, warnings=warnings,
        )  # fmt: skip
        self._applied = None
        return self.adapters[name]

    def add_embedding(self, path: str | Path, token: str | None = None, force: bool = False) -> Adapter:
        """Loads a Textual Inversion embedding (any layout in FORMATS.md) as `token` (default: the file stem, as in
        A1111). A multi-vector embedding registers `token`, `token_1`, ...; prompts name `token` alone.

        Raises:
            IncompatibleArtifactError: Its width or record does not fit this base (the pipeline is unchanged).
            FormatError: Not an embedding, unreadable, or the token is already a word or a loaded adapter.
        """
        path = Path(path)
        token = token or path.stem
        artifact, warnings = self._checked_artifact(path, "embedding", token, force)
        targets = compat.embedding_targets(artifact, self.base.family)
        tokens = [token] + [f"{token}_{i}" for i in range(1, targets[0][1].shape[0])]
        taken = [t for t in tokens for tokenizer in self.base.tokenizers.values() if t in tokenizer.get_vocab()]
        if taken:
            raise formats.FormatError(
                f"{path}: the token {taken[0]!r} is already in the tokenizer's vocabulary, so the embedding would "
                "change the meaning of an existing word. Load it under another token (token=..., `--embedding "
                "FILE:TOKEN`) or rename the file (A1111 uses the file stem)."
            )
        try:
            for spec, vectors in targets:  # one call per text encoder, as diffusers documents for SDXL pairs
                encoder, tokenizer = getattr(self.pipe, spec.component), getattr(self.pipe, spec.tokenizer)
                self.pipe.load_textual_inversion(vectors, token=tokens, text_encoder=encoder, tokenizer=tokenizer)
        except Exception:
            self._unload_tokens(tokens)
            raise
        self.adapters[token] = Adapter(
            token, "embedding", path, short_hash(path, "embedding"), tokens=tuple(tokens), warnings=warnings
        )
        return self.adapters[token]

    def _checked_artifact(self, path: Path, kind: str, name: str, force: bool):
        if name in self.adapters:
            raise formats.FormatError(
                f"{path}: an adapter named {name!r} is already loaded; remove it or pick another name."
            )
        artifact = formats.read_artifact(path)
        if artifact.kind != kind:
            raise formats.FormatError(f"{path} is a {artifact.kind}, not a {kind}; load it with add_{artifact.kind}.")
        warnings = compat.require_fit(artifact, self.base, force, self._tokenizer_fingerprint)
        for warning in warnings:
            logger.warning("%s: loaded with force although it %s", path, warning)
        return artifact, warnings

    def set_weight(
        self, name: str, weight: float | None = None, text_encoder_weight: float | None = None,
        unet_weight: float | None = None, active: bool | None = None,
    ) -> None:  # fmt: skip
        """Changes a loaded LoRA's weights (both with `weight`, or one component) or whether it is always applied."""
        adapter = self._lora(name)
        if weight is not None:
            adapter.text_encoder_weight = adapter.unet_weight = float(weight)
        if text_encoder_weight is not None:
            adapter.text_encoder_weight = float(text_encoder_weight)
        if unet_weight is not None:
            adapter.unet_weight = float(unet_weight)
        if active is not None:
            adapter.active = active

    def remove(self, name: str) -> None:
        """Unloads a LoRA or embedding; the pipeline is then as if it had never been loaded."""
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        adapter = self.adapters.pop(name)
        if adapter.kind == "embedding":
            self._unload_tokens(list(adapter.tokens))
            return
        self._unfuse()
        self._delete_internal(adapter.internal_name)
        self._applied = None

    def _unload_tokens(self, tokens: list[str]) -> None:
        """Takes embedding tokens out of every tokenizer and text encoder that has them."""
        for spec in self.base.family.text_encoders:
            tokenizer = getattr(self.pipe, spec.tokenizer)
            if any(token in tokenizer.get_vocab() for token in tokens):
                encoder = getattr(self.pipe, spec.component)
                self.pipe.unload_textual_inversion(tokens, tokenizer=tokenizer, text_encoder=encoder)

    def _lora(self, name: str) -> Adapter:
        adapter = self.adapters.get(name)
        if adapter is None or adapter.kind != "lora":
            loaded = ", ".join(n for n, a in self.adapters.items() if a.kind == "lora") or "none"
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded LoRAs: {loaded})")
        return adapter

    def _verify_loaded(self, artifact, internal: str) -> None:
        """Fails closed when diffusers' loader skipped modules of the file (it only logs unmatched keys)."""
        key_map = formats.module_key_map(self.base.family, self.base.adaptable(), other_spelling=True)
        missing = []
        for name in artifact.lora_modules:
            component, module_path, _ = key_map[name]
            layer = getattr(self.pipe, component).get_submodule(module_path)
            if internal not in getattr(layer, "lora_A", {}):
                missing.append(name)
        if missing:
            raise formats.FormatError(
                f"{artifact.path}: diffusers' LoRA loader left {len(missing)} of {len(artifact.lora_modules)} "
                f"modules unapplied (first: {missing[0]}). A text-encoder part whose attention lacks out_proj is a "
                "known case (shared/FORMATS.md, rule 3). Re-export the file with sdtune, or load it in A1111/ComfyUI."
            )

    def _delete_internal(self, internal: str) -> None:
        if any(internal in names for names in self.pipe.get_list_adapters().values()):
            self.pipe.delete_adapters(internal)
        if not any(self.pipe.get_list_adapters().values()):
            self.pipe.unload_lora_weights()  # the last one: take the peft wrappers out, modules as loaded

    # -- applying the stack ------------------------------------------------------------------------------------
    def fuse(self, enabled: bool = True) -> None:
        """Bakes the weighted LoRAs into the weights before each generation (any change unfuses; `fuse(False)`)."""
        self._fuse_wanted = enabled
        if not enabled:
            self._unfuse()

    @property
    def fused(self) -> bool:
        """Whether LoRA weights are baked into the model weights right now."""
        return self._fused

    def apply(self, extra: dict[str, tuple[float, float]] | None = None) -> None:
        """Makes the active LoRAs (plus `extra`: name -> (text-encoder, UNet) weights, e.g. from prompt tags) the ones
        diffusers applies, fusing them when asked. `generate` calls it; call it to inspect the adapted modules."""
        weights = {
            n: (a.text_encoder_weight, a.unet_weight)
            for n, a in self.adapters.items()
            if a.kind == "lora" and a.active
        }
        for name, pair in (extra or {}).items():
            self._lora(name)
            weights[name] = pair
        state = tuple(sorted(weights.items()))
        if state != self._applied:
            self._unfuse()
            self._set_adapters(weights)
            self._applied = state
        if self._fuse_wanted and weights and not self._fused:
            self.pipe.fuse_lora(
                components=self._lora_components, adapter_names=[self.adapters[n].internal_name for n in weights]
            )
            self._fused = True

    def _set_adapters(self, weights: dict[str, tuple[float, float]]) -> None:
        if not any(a.kind == "lora" for a in self.adapters.values()):
            return
        if not weights:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        names, per_component = [], []
        for name, (text_encoder_weight, unet_weight) in weights.items():
            adapter = self.adapters[name]
            names.append(adapter.internal_name)
            per_component.append({c: unet_weight if c == "unet" else text_encoder_weight for c in adapter.components})
        self.pipe.set_adapters(names, adapter_weights=per_component)

    def _unfuse(self) -> None:
        if self._fused:
            self.pipe.unfuse_lora(components=self._lora_components)
            self._fused = False

    # -- generating --------------------------------------------------------------------------------------------
    def default_size(self) -> int:
        """The base model's native image side (UNet sample size x VAE scale factor)."""
        return self.base.unet.config.sample_size * self.pipe.vae_scale_factor

    def set_sampler(self, sampler: str) -> None:
        """Switches the sampler (see `SAMPLERS`)."""
        self.pipe.scheduler = make_scheduler(sampler, self.base.scheduler_config)
        self.sampler = sampler

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        negative_prompt: str = "",
        steps: int = 20,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        extra_loras: dict[str, tuple[float, float]] | None = None,
        clip_skip: int = 1,
    ) -> list[Image.Image]:
        """One image per prompt, prompt `i` drawn from `seeds[i]` whatever else is in the batch (see
        `generate_images`), with the active LoRAs plus `extra_loras` (name -> (text-encoder, UNet) weights) applied.

        Returns:
            The images, in prompt order.

        Raises:
            SettingError: A size, step count, guidance, seed or clip_skip that cannot be drawn (before anything runs).
            NonFiniteImageError: An image decoded to NaN or infinite pixels (`error.images` holds the others).
        """
        if clip_skip > 1 and not self.base.family.clip_skip:
            raise ValueError(
                f"clip_skip {clip_skip}: {self.base.family.title} has none (it reads the penultimate layer)"
            )
        if not 1 <= clip_skip <= self.max_clip_skip():
            raise SettingError(
                f"clip_skip {clip_skip} is outside 1..{self.max_clip_skip()}, the text encoder's layers"
            )
        self.apply(extra_loras)
        default = self.default_size()
        size = (default if width is None else width, default if height is None else height)
        return generate_images(
            self.pipe, self.base.family, prompts, seeds, size, steps, guidance, negative_prompt, clip_skip,
            batch_size=max(1, len(prompts)), check_finite=True,
        )  # fmt: skip

    def max_clip_skip(self) -> int:
        """The largest `clip_skip` the base has: counted back from its family's layer to the first encoder layer."""
        spec = self.base.family.text_encoders[0]
        layers = getattr(self.pipe, spec.component).config.num_hidden_layers
        return layers + spec.hidden_layer + 1 if self.base.family.clip_skip else 1

    def token_count(self, text: str) -> tuple[int, int]:
        """(tokens of `text` as the text encoder sees it, embeddings expanded; the tokens it reads), start and end
        tokens not counted. The pipeline cuts a longer prompt (`models.encode_text` as well)."""
        tokenizer = getattr(self.pipe, self.base.family.text_encoders[0].tokenizer)
        expanded = self.pipe.maybe_convert_prompt(text, tokenizer)
        return len(tokenizer(expanded).input_ids) - 2, tokenizer.model_max_length - 2


def image_grid(images: list[Image.Image], columns: int, scale: int = 1) -> Image.Image:
    """The images tiled left to right, top to bottom (nearest-neighbour upscaled by `scale`)."""
    width, height = images[0].width * scale, images[0].height * scale
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index, image in enumerate(images):
        tile = image if scale == 1 else image.resize((width, height), Image.Resampling.NEAREST)
        grid.paste(tile, ((index % columns) * width, (index // columns) * height))
    return grid


def save_png(image: Image.Image, path: Path, text: dict[str, str] | None = None) -> Path:
    """Writes a PNG (with `text` as tEXt chunks, e.g. A1111's `parameters`) atomically."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    with atomic.atomic_file(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)
    return path
