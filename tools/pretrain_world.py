"""Trains the small base models of the synthetic world (tools/world/) from scratch, on CPU: the SD1 architecture or
the SDXL one (two text encoders, pooled embedding, time ids).

    python tools/pretrain_world.py --out sample_data/world-sd1
    python tools/pretrain_world.py --family sdxl --out sample_data/world-sdxl --vae-from sample_data/world-sd1
    python tools/pretrain_world.py --init-from sample_data/world-sd1-sizes --vae-from sample_data/world-sd1-sizes \
        --small-per-scene 8 --filler-fraction 0.1 --steps 1500 --eval-every 500 --out sample_data/world-sd1-words

Deterministic for the same arguments and thread count. Stages:
1. Render 16 jittered images of every held-in scene (5 shapes x 8 colours x 7 backgrounds, minus the 10% of triples
   kept unseen; star and heart never appear).
2. Train the VAE (one 2x downsample: 32x32x3 -> 16x16x4) on reconstruction with a small KL term.
3. Train UNet and CLIP text encoder(s) jointly on the latents (epsilon objective, AdamW 2e-3, EMA of the weights, 10%
   empty captions, 15% without the colour word so that a one-token placeholder caption still reads right, offset
   noise 0.1, half the timesteps drawn from t >= 700), scoring the EMA weights every 1,000 steps with the world
   metric (DPM-Solver++ 20 steps, guidance 3, prompts encoded by the diffusers pipeline itself) and keeping the
   best. SDXL is conditioned as `StableDiffusionXLPipeline` conditions it at inference (`DenoiserRun.conditioning`).
4. Save the best (fp16) as a diffusers folder, an original-layout single-file checkpoint, and a model card with the
   scores.

About 65 minutes on one core of a 2-core machine with the defaults. What each setting did is in docs/quality.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import world
from sdtune import models
from world import quality

CAPTION_TEMPLATE = "a {size}{color} {shape} on a {background} background"
NO_COLOR_TEMPLATE = "a {size}{shape} on a {background} background"
UNET_CONFIG = {
    **models.TINY_CONFIGS["unet"],
    "sample_size": 16,
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 4,
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
TEXT_CONFIG = {**models.TINY_CONFIGS["text_encoder"], "intermediate_size": 64, "num_hidden_layers": 2}
# The SDXL architecture at the same scale: two text encoders whose penultimate states are concatenated (16 + 16 = the
# SD1 world's 32-wide context), the second one's projected end-of-text state as the pooled embedding, and the time
# ids in the added embedding (16 + 6 x 8). Three layers each, so the penultimate state has been through two. Width 16
# keeps the folder under 15 MB: the 49,408-token embedding tables and the two tokenizer files are most of it.
XL_TEXT_CONFIG = {
    **TEXT_CONFIG,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 16,
}
XL_TEXT_CONFIG_2 = {
    **XL_TEXT_CONFIG, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "pad_token_id": 0,
}  # fmt: skip
XL_UNET_CONFIG = {
    **UNET_CONFIG,
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,
}
ARCHITECTURES = {  # family -> (sdtune preset whose other configs it keeps, UNet config, text-encoder configs)
    "sd1": ("tiny", UNET_CONFIG, {"text_encoder": TEXT_CONFIG}),
    "sdxl": ("tiny-sdxl", XL_UNET_CONFIG, {"text_encoder": XL_TEXT_CONFIG, "text_encoder_2": XL_TEXT_CONFIG_2}),
}


def render_dataset(scenes: list[world.Scene], per_scene: int, seed: int) -> tuple[torch.Tensor, list[world.Scene]]:
    """`per_scene` jittered renders of every scene as a [-1, 1] tensor, with the scene of each row."""
    rng = random.Random(seed)
    images, labels = [], []
    for scene in scenes:
        for _ in range(per_scene):
            array = torch.frombuffer(bytearray(world.render_jittered(scene, rng).tobytes()), dtype=torch.uint8)
            images.append(array.view(world.SIZE, world.SIZE, 3).permute(2, 0, 1).float() / 127.5 - 1)
            labels.append(scene)
    return torch.stack(images), labels


def train_vae(pixels: torch.Tensor, steps: int, seed: int):
    """Reconstruction + 1e-6 KL, AdamW 1e-3, batch 32. Returns the VAE with its latent scaling factor set."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = pixels[torch.randint(len(pixels), (32,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae


# Words a filler never is (`--filler-fraction`): the world's own words and the triggers the benchmarks use, so that
# `a hollow red circle ...` on a filler-trained base measures a word the base never saw.
FILLER_HELD_OUT = frozenset(
    {*world.COLORS, *world.ALL_SHAPES, "background", "small", "hollow", "sks", "ohwx", "big", "ring", "outlined"}
)


UNKNOWN_WORD = "hollow"  # the style benchmark's trigger (`hollow_adjective`), held out of the fillers


def filler_words(tokenizer) -> list[str]:
    """Whole English-looking words of the CLIP vocabulary that are one token each (`red</w>` -> `red`), sorted,
    without `FILLER_HELD_OUT`: about 30,000 words."""
    words = (token[: -len("</w>")] for token in tokenizer.get_vocab() if token.endswith("</w>"))
    return sorted(w for w in words if len(w) >= 3 and w.isascii() and w.isalpha() and w not in FILLER_HELD_OUT)


def caption_for(
    scene: world.Scene, rng: random.Random, fillers: list[str] | None = None, filler_fraction: float = 0.0
) -> str:
    """10% empty (for classifier-free guidance), 15% without the colour word, the rest the canonical caption.

    The colour-less form `a circle on a blue background` has exactly the shape of a personalization caption with a
    one-token placeholder (`a <star> on a blue background`), so such a caption reads right before any training. A
    first run with six varied wordings learned shapes but not which colour word is the object's and which the
    background's within 3,000 steps (13% fully correct).

    With `filler_fraction`, that fraction of the canonical captions of flat scenes carries a random word of
    `fillers` where the size word goes (`a quiet red circle on a blue background`, drawn flat): a real CLIP encoder
    reads any word without losing the others, the world's learns that only from such captions (docs/quality.md,
    "What the trigger does to the words after it").
    """
    draw = rng.random()
    if draw < 0.10:
        return ""
    template = NO_COLOR_TEMPLATE if draw < 0.25 else CAPTION_TEMPLATE
    size = "small " if scene.style == "small" else ""
    if filler_fraction and template is CAPTION_TEMPLATE and not size and rng.random() < filler_fraction:
        size = rng.choice(fillers) + " "
    return template.format(size=size, color=scene.color, shape=scene.shape, background=scene.background)


def _ema_update(ema: list[torch.Tensor], params: list[torch.nn.Parameter], decay: float) -> None:
    with torch.no_grad():
        for average, param in zip(ema, params, strict=True):
            average.mul_(decay).add_(param.detach(), alpha=1 - decay)


class DenoiserRun:
    """The state of the joint UNet + text encoder(s) training: models, optimizer, EMA weights, random streams."""

    def __init__(self, latent_dists, labels, vae_scale: float, args):
        import transformers
        from diffusers import DDPMScheduler, UNet2DConditionModel

        torch.manual_seed(args.seed)
        self.args, self.labels, self.vae_scale = args, labels, vae_scale
        self.mean, self.std = latent_dists
        preset, unet_config, text_configs = ARCHITECTURES[args.family]
        self.family = models.PRESETS[preset][0]
        self.tokenizers, self.text_encoders = {}, {}
        for spec in self.family.text_encoders:
            config = {
                k: v for k, v in text_configs[spec.component].items() if k not in ("architectures", "model_type")
            }
            model_class = getattr(transformers, spec.model_class)
            self.text_encoders[spec.component] = model_class(transformers.CLIPTextConfig(**config))
            self.tokenizers[spec.tokenizer] = models.build_clip_tokenizer(spec.pad_token)
        self.unet = UNet2DConditionModel.from_config(unet_config)
        if args.init_from:  # continued pretraining: the same architecture, started from a saved base's weights
            self.unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.init_from / "unet").state_dict())
            for name, encoder in self.text_encoders.items():
                saved = type(encoder).from_pretrained(args.init_from / name)
                encoder.load_state_dict(saved.state_dict())
        self.fillers = filler_words(next(iter(self.tokenizers.values()))) if args.filler_fraction else None
        self.scheduler = DDPMScheduler.from_config(models.preset_configs(preset)["scheduler"])
        self.params = list(self.unet.parameters())
        self.params += [p for encoder in self.text_encoders.values() for p in encoder.parameters()]
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr)
        self.rng, self.generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
        self.step, self.started = 0, time.perf_counter()

    def noise(self, shape: torch.Size) -> torch.Tensor:
        """Gaussian noise plus `offset_noise` x a per-image, per-channel constant.

        The offset (Crosslabs, "Diffusion with Offset Noise", 2023) matters more than usual here: in a 16x16 latent
        the image mean is the background colour, and at the last timestep of SD's schedule the noisy latent still
        carries sqrt(alpha_bar) = 0.07 of it, about as much as the mean of the noise itself. Without the offset the
        model learns to read the background off the starting noise instead of the prompt.
        """
        noise = torch.randn(shape, generator=self.generator)
        offset = torch.randn(shape[0], shape[1], 1, 1, generator=self.generator)
        return noise + self.args.offset_noise * offset

    def timesteps(self, batch: int) -> torch.Tensor:
        """Uniform timesteps, except that a `high_noise_fraction` of them is drawn from `[high_noise_from, T)`.

        In this flat world an image's colours are readable from the noisy latent once the noise is below t ~ 850
        (the image mean's signal-to-noise ratio passes 1), so only the top ~15% of uniform timesteps teach the model
        to take object and background colour from the text. Drawing more of them there teaches it sooner.
        """
        total = self.scheduler.config.num_train_timesteps
        uniform = torch.randint(0, total, (batch,), generator=self.generator)
        high = torch.randint(self.args.high_noise_from, total, (batch,), generator=self.generator)
        pick_high = torch.rand(batch, generator=self.generator) < self.args.high_noise_fraction
        return torch.where(pick_high, high, uniform)

    def train(self, steps: int) -> None:
        """`steps` optimizer steps on random batches; prints the loss every 250 steps."""
        args = self.args
        for _ in range(steps):
            index = torch.randint(len(self.mean), (args.batch,), generator=self.generator)
            sampled = self.mean[index] + self.std[index] * torch.randn(
                self.mean[index].shape, generator=self.generator
            )
            latents, noise = sampled * self.vae_scale, self.noise(sampled.shape)
            timesteps = self.timesteps(args.batch)
            captions = [
                caption_for(self.labels[i], self.rng, self.fillers, args.filler_fraction) for i in index.tolist()
            ]
            states, extra = self.conditioning(captions)
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            prediction = self.unet(noisy, timesteps, states, **extra).sample
            loss = F.mse_loss(prediction, noise)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            _ema_update(self.ema, self.params, args.ema)
            if self.step % 250 == 0:
                print(
                    f"step {self.step}: loss {loss.item():.4f} ({time.perf_counter() - self.started:.0f} s)",
                    flush=True,
                )
            self.step += 1

    def conditioning(self, captions: list[str]) -> tuple[torch.Tensor, dict]:
        """The UNet's text inputs for `captions`, computed as diffusers' pipelines compute them at inference.

        SD1: the text encoder's last hidden state (`StableDiffusionPipeline.encode_prompt`). SDXL, written out from
        `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids` rather than from sdtune's own code (so the
        SDXL benchmark rows, trained by sdtune and scored through the pipeline, test sdtune against the pipeline):
        both encoders' `hidden_states[-2]` side by side, the second one's `text_embeds` as the pooled embedding,
        zeros for an empty caption (`force_zeros_for_empty_prompt`, the unconditional branch of guidance), and the
        time ids of a 32x32 image drawn whole: original size 32x32, crop (0, 0), target 32x32.
        """
        ids = {
            spec.component: self.tokenizers[spec.tokenizer](
                captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            for spec in self.family.text_encoders
        }  # fmt: skip
        if not self.family.time_ids:
            return self.text_encoders["text_encoder"](ids["text_encoder"])[0], {}
        outputs = [self.text_encoders[name](ids[name], output_hidden_states=True) for name in ids]
        states = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        pooled = outputs[-1].text_embeds
        keep = torch.tensor([caption != "" for caption in captions], dtype=states.dtype)
        states, pooled = states * keep[:, None, None], pooled * keep[:, None]
        time_ids = torch.tensor([[world.SIZE, world.SIZE, 0, 0, world.SIZE, world.SIZE]], dtype=states.dtype)
        return states, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(captions), 1)}}

    def ema_models(self):
        """Copies of the text encoders and the UNet carrying the EMA weights, in eval mode without gradients:
        (text encoders by pipeline attribute name, UNet)."""
        text_encoders = {name: copy.deepcopy(encoder) for name, encoder in self.text_encoders.items()}
        unet = copy.deepcopy(self.unet)
        params = list(unet.parameters()) + [p for encoder in text_encoders.values() for p in encoder.parameters()]
        with torch.no_grad():
            for param, average in zip(params, self.ema, strict=True):
                param.copy_(average)
        for model in (unet, *text_encoders.values()):
            model.eval().requires_grad_(False)
        return text_encoders, unet


def train_denoiser(run: DenoiserRun, vae, held_in, unseen, scheduler_config: dict):
    """Trains in rounds of `--eval-every` steps, scores the EMA model after each and keeps the best one.

    The loss plateaus long before the images are right, so the metric, not the loss, picks the weights.
    Returns (text encoders, UNet, scores, step) of the best round.
    """
    best = None
    while run.step < run.args.steps:
        run.train(min(run.args.eval_every, run.args.steps - run.step))
        text_encoders, unet = run.ema_models()
        components = {**run.tokenizers, **text_encoders, "unet": unet, "vae": vae}
        pipe = quality.world_pipeline(run.family, components, scheduler_config)
        small, filler = run.args.small_per_scene > 0, run.args.filler_fraction > 0
        scores = evaluate_model(pipe, held_in, unseen, run.args.seed, small=small, filler=filler)
        rank = scores["held_in"]["all"] + scores["unseen"]["all"] + scores.get("unknown_word", {}).get("all", 0.0)
        extra = f", {UNKNOWN_WORD!r} after 'a' {scores['unknown_word']['all']:.3f}" if filler else ""
        print(
            f"step {run.step}: held-in {scores['held_in']['all']:.3f}, unseen {scores['unseen']['all']:.3f}{extra}",
            flush=True,
        )
        if best is None or rank > best[0]:
            best = (rank, text_encoders, unet, scores, run.step)
    return best[1:]


def evaluate_model(
    pipe, held_in: list[world.Scene], unseen: list[world.Scene], seed: int, small: bool = False, filler: bool = False
) -> dict:
    """Held-in, unseen-combination and colour-less ("a star on a blue background") prompt scores; with `small`, also
    `small_score` of 48 held-in scenes prompted small; with `filler`, the same 48 scenes prompted with the never-seen
    word `UNKNOWN_WORD` where the size word goes (`unknown_word`: does the base still draw what the words say?)."""
    sample = random.Random(seed).sample(held_in, 96)
    short = [world.Scene(s.shape, s.color, s.background) for s in sample[:48]]
    short_prompts = [f"a {s.shape} on a {s.background} background" for s in short]
    short_scores = world.score(quality.generate(pipe, short_prompts, seed=seed + 7), short)
    scores = {
        "held_in": quality.evaluate(pipe, sample, seed=seed),
        "unseen": quality.evaluate(pipe, unseen, seed=seed + 1000),
        "no_color_word": {"shape": short_scores["shape"], "background": short_scores["background"]},
    }
    if small:
        scenes = [world.Scene(s.shape, s.color, s.background, "small") for s in sample[48:]]
        scores["small"] = small_score(quality.generate(pipe, [s.caption() for s in scenes], seed=seed + 2000), scenes)
    if filler:
        scenes = sample[48:]
        prompts = [f"a {UNKNOWN_WORD} {s.color} {s.shape} on a {s.background} background" for s in scenes]
        scores["unknown_word"] = quality.evaluate(pipe, scenes, prompts, seed=seed + 3000)
    return scores


SMALL_AREA = (12, 100)  # object pixels of a small shape (radius 3.6-4.4: 25-60) against 150-300 at full size


def small_score(images: list, scenes: list[world.Scene]) -> dict[str, float]:
    """Fractions of `a small ...` images with the object's colour and the background right, and the object small
    (`SMALL_AREA` pixels of it; the metric's shape templates are full-size, so the shape itself is not read)."""
    readings = [world.read_image(image) for image in images]
    right = [
        (r.color == s.color, r.background == s.background, SMALL_AREA[0] <= r.area <= SMALL_AREA[1])
        for r, s in zip(readings, scenes, strict=True)
    ]
    names = ("color", "background", "small")
    scores = {name: sum(row[i] for row in right) / len(right) for i, name in enumerate(names)}
    return {**scores, "all": sum(all(row) for row in right) / len(right)}


def _score_table(scores: dict) -> str:
    lines = ["| prompts | all correct | shape | colour | background |", "|---|---|---|---|---|"]
    for name, label in (("held_in", "held-in combinations (96)"), ("unseen", "unseen combinations (28)")):
        row = scores[name]
        lines.append(
            f"| {label} | {row['all']:.3f} | {row['shape']:.3f} | {row['color']:.3f} | {row['background']:.3f} |"
        )
    short = scores["no_color_word"]
    lines.append(
        f"| no colour word, 'a circle on a blue background' (48) | — | {short['shape']:.3f} | — | "
        f"{short['background']:.3f} |"
    )
    if "small" in scores:  # the shape is not read at this size (`small_score`): its column says whether it is small
        small = scores["small"]
        lines.append(
            f"| 'a small red circle on a blue background' (48; shape column: drawn small) | {small['all']:.3f} | "
            f"{small['small']:.3f} | {small['color']:.3f} | {small['background']:.3f} |"
        )
    if "unknown_word" in scores:
        row = scores["unknown_word"]
        lines.append(
            f"| '{UNKNOWN_WORD}' where the size word goes, 'a {UNKNOWN_WORD} red circle ...' (48; drawn flat) | "
            f"{row['all']:.3f} | {row['shape']:.3f} | {row['color']:.3f} | {row['background']:.3f} |"
        )
    return "\n".join(lines)


COMPONENTS = {
    "sd1": "the SD1 architecture in diffusers (AutoencoderKL with one 2x downsample, 16x16x4 latents; "
    "UNet2DConditionModel (32, 64) channels; CLIPTextModel width 32, 2 layers)",
    "sdxl": "the SDXL architecture in diffusers (the same AutoencoderKL; UNet2DConditionModel (32, 64) channels with "
    "linear projections and the `text_time` added embedding; CLIPTextModel and CLIPTextModelWithProjection, width 16, "
    "3 layers each, their penultimate states side by side as the 32-wide context, the second one's projected "
    "end-of-text state pooled; time ids of the whole 32x32 image), trained with the conditioning "
    "`StableDiffusionXLPipeline` computes at inference (empty captions as zeros)",
}


def model_card(args, scores: dict, seconds: float) -> str:
    """The README of the saved model: what it is, how it was made, how well it draws."""
    vae_note = f" --vae-from {args.vae_from}" if getattr(args, "vae_from", None) else ""
    small = getattr(args, "small_per_scene", 0)
    vae_note += f" --small-per-scene {small}" if small else ""
    small_note = (
        f" Every held-in scene was also drawn small ({small} renders each, the shape at {world.HOLE_SCALE} of its "
        "radius: the size of the hollow style's hole), captioned `a small red circle on a blue background`."
        if small
        else ""
    )
    fraction, init_from = getattr(args, "filler_fraction", 0.0), getattr(args, "init_from", None)
    vae_note += f" --filler-fraction {fraction}" if fraction else ""
    vae_note += f" --init-from {init_from}" if init_from else ""
    if fraction:
        small_note += (
            f" {fraction:.0%} of the flat scenes' full captions carried a random word of the CLIP vocabulary where"
            f" the size word goes (`a quiet red circle ...`, drawn flat; never {UNKNOWN_WORD!r}, `sks` or the world's"
            " own words), so that an unknown word there leaves the colour words readable."
        )
    if init_from:
        small_note += f" Training started from the weights of `{init_from}` (continued pretraining)."
    family = models.PRESETS[ARCHITECTURES[args.family][0]][0]
    return f"""# {args.out.name}: a small {family.title}-architecture model of a synthetic world

Made by `python tools/pretrain_world.py --family {args.family} --out {args.out} --steps {args.steps}
--vae-steps {args.vae_steps} --batch {args.batch} --lr {args.lr} --ema {args.ema} --offset-noise {args.offset_noise}
--high-noise-fraction {args.high_noise_fraction} --high-noise-from {args.high_noise_from}
--eval-every {args.eval_every} --seed {args.seed} --threads {args.threads}{vae_note}`
in {seconds / 60:.0f} CPU minutes; these weights are the EMA
after step {scores["step"]}, the best-scoring of the rounds.

It knows 32x32 images of one flat shape ({", ".join(world.PRETRAIN_SHAPES)}) in one of 8 colours
({", ".join(world.COLORS)}) on another as background, captioned like `a red circle on a blue background`.
10% of the (shape, colour, background) triples were never trained on; `star` and `heart` never appear: they are the
personalization concepts.{small_note} Components: {COMPONENTS[args.family]}, with the real CLIP
tokenizer. Weights in fp16. Files: this folder (diffusers layout) and `../{args.out.name}.safetensors` (original
layout).

Scores (fraction of generated images whose shape, colour and background are all right; DPM-Solver++ 20 steps,
guidance 3, fixed seeds; the metric is `world.score` in sdtune's tools/world):

{_score_table(scores)}

The no-colour-word row is the one-token-placeholder check: a prompt one word shorter must still put the background
right.
"""


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sample_data/world-sd1"))
    parser.add_argument("--family", choices=ARCHITECTURES, default="sd1", help="the architecture to train")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--offset-noise", type=float, default=0.1, help="see DenoiserRun.noise")
    parser.add_argument("--high-noise-fraction", type=float, default=0.5, help="see DenoiserRun.timesteps")
    parser.add_argument("--high-noise-from", type=int, default=700, help="see DenoiserRun.timesteps")
    parser.add_argument(
        "--eval-every", type=int, default=1000, help="score the EMA model every N steps, keep the best"
    )
    parser.add_argument(
        "--small-per-scene",
        type=int,
        default=0,
        help="also render every held-in scene this many times small (`a small red circle ...`, the hollow style's "
        "hole size): a base that knows the pieces a style is made of (docs/quality.md#a-style)",
    )
    parser.add_argument(
        "--filler-fraction",
        type=float,
        default=0.0,
        help="put a random vocabulary word where the size word goes in this fraction of the flat scenes' full "
        "captions (`a quiet red circle ...`, drawn flat), so that the text encoder learns to read an unknown word "
        "without garbling the colour words after it (caption_for)",
    )
    parser.add_argument(
        "--init-from", type=Path, help="start the UNet and text encoder(s) from this saved base (continued training)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 was faster and steadier than 2 on a 2-core machine")
    parser.add_argument(
        "--vae-from", type=Path, help="reuse the VAE of an earlier run's output folder (skips stage 2)"
    )
    parser.add_argument("--vae-only", action="store_true", help="train and save the VAE (OUT/vae), then stop")
    args = parser.parse_args(argv)
    if args.small_per_scene < 0:
        parser.error(f"--small-per-scene: {args.small_per_scene} is negative; give 0 (off) or a count such as 8")
    if not 0.0 <= args.filler_fraction < 1.0:
        parser.error(f"--filler-fraction: {args.filler_fraction} is outside [0, 1); give e.g. 0.3, or 0 for none")
    if args.init_from and not (args.init_from / "unet").is_dir():
        parser.error(f"--init-from: {args.init_from} has no unet/ folder; give a base saved by this script")
    if args.init_from and (mismatch := architecture_mismatch(args.init_from, args.family)):
        parser.error(
            f"--init-from: {args.init_from} is not the --family {args.family} architecture ({mismatch}); give a "
            f"base this script saved with --family {args.family}, or the --family it was saved with"
        )
    return args


def architecture_mismatch(base: Path, family: str) -> str:
    """How the UNet config saved in `base` differs from `family`'s pretraining architecture (`ARCHITECTURES`), as
    `key: saved != expected` items; empty when the weights fit."""
    from diffusers import UNet2DConditionModel

    saved = json.loads((base / "unet" / "config.json").read_text(encoding="utf-8"))
    # every config entry with diffusers' defaults filled in (the tiny model builds in milliseconds), as JSON lists
    expected = json.loads(json.dumps(dict(UNet2DConditionModel.from_config(ARCHITECTURES[family][1]).config)))
    return ", ".join(
        f"{key}: {saved.get(key)!r} != {value!r}"
        for key, value in expected.items()
        if not key.startswith("_") and saved.get(key) != value
    )


def main() -> None:
    """Parses arguments, runs the stages, saves the model and its card."""
    args = _arguments()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    held_in, unseen = world.split_scenes(seed=args.seed)
    pixels, labels = render_dataset(held_in, per_scene=16, seed=args.seed)
    if args.small_per_scene:
        small = [world.Scene(s.shape, s.color, s.background, "small") for s in held_in]
        small_pixels, small_labels = render_dataset(small, per_scene=args.small_per_scene, seed=args.seed + 1)
        pixels, labels = torch.cat([pixels, small_pixels]), labels + small_labels
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = (
            AutoencoderKL.from_pretrained(args.vae_from / "vae", torch_dtype=torch.float32)
            .eval()
            .requires_grad_(False)
        )
    else:
        vae = train_vae(pixels, args.vae_steps, args.seed)
    if args.vae_only:  # for `--vae-from` in several denoiser runs that differ in other settings
        vae.save_pretrained(args.out / "vae")
        print(f"wrote {args.out / 'vae'}", flush=True)
        return
    with torch.no_grad():
        dists = [vae.encode(pixels[i : i + 256]).latent_dist for i in range(0, len(pixels), 256)]
    latent_dists = (torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]))
    run = DenoiserRun(latent_dists, labels, vae.config.scaling_factor, args)
    preset, _, text_configs = ARCHITECTURES[args.family]
    scheduler_config = models.preset_configs(preset)["scheduler"]
    text_encoders, unet, scores, best_step = train_denoiser(run, vae, held_in, unseen, scheduler_config)
    scores["step"] = best_step
    print(json.dumps(scores, indent=2), flush=True)
    configs = copy.deepcopy(models.preset_configs(preset))
    configs.update({"unet": dict(unet.config), "vae": dict(vae.config), **text_configs})
    components = {**run.tokenizers, **text_encoders, "unet": unet, "vae": vae}
    components.update({"scheduler_config": scheduler_config, "configs": configs})
    checkpoint = args.out.with_name(args.out.name + ".safetensors")
    models.save_base_model(components, args.out, checkpoint, dtype=torch.float16)
    (args.out / "README.md").write_text(model_card(args, scores, time.perf_counter() - started), encoding="utf-8")
    (args.out / "scores.json").write_text(json.dumps(scores, indent=2), encoding="utf-8")
    print(f"wrote {args.out} and {checkpoint}", flush=True)


if __name__ == "__main__":
    main()
