"""Where the world model's UNet looks in a prompt: the share of its cross-attention per token position.

    python tools/world_attention.py ["hollow red circle on a yellow background" ...]
    python tools/world_attention.py --trigger hollow     # how much a trigger word changes what the UNet reads
    python tools/world_attention.py --trigger "<hollow>" --embedding hollow.safetensors   # a learned token's
    python tools/world_attention.py --trigger hollow --slot adjective --content   # does the base still read the rest?

Averaged over every cross-attention layer, head and pixel, and three noise draws at timesteps 200, 500 and 800;
the caption's tokens are listed one by one, the padding after its end (the causal text encoder's states of the
whole caption, repeated) as one sum. docs/quality.md#results uses it to explain why a UNet LoRA keyed to a style's
trigger word learns its training captions instead of the trigger.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

import world
from world import quality

DEFAULT_PROMPTS = (
    "a red circle on a yellow background",
    "hollow red circle on a yellow background",
    "hollow blue circle on a purple background",
)


class _RecordingCrossAttention:
    """Plain attention (diffusers' `Attention` helpers) that keeps the mean attention per key position."""

    def __init__(self, shares: list):
        self.shares = shares

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probabilities = attn.get_attention_scores(query, key, None)
        self.shares.append(probabilities.mean(dim=(0, 1)))
        out = attn.batch_to_head_dim(torch.bmm(probabilities, value))
        return attn.to_out[1](attn.to_out[0](out))


def load(base: Path) -> tuple[CLIPTokenizer, CLIPTextModel, UNet2DConditionModel]:
    """The tokenizer, text encoder and UNet of an SD1 diffusers folder, in fp32."""
    return (
        CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=torch.float32),
        UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32),
    )


def attention_shares(models: tuple, prompt: str) -> tuple[list[tuple[str, float]], float]:
    """([(token, share)] for the caption's tokens, the padding's summed share) for `prompt` on `load`'s models."""
    tokenizer, encoder, unet = models
    shares: list = []
    processors = unet.attn_processors
    unet.set_attn_processor(
        {name: _RecordingCrossAttention(shares) if "attn2" in name else processors[name] for name in processors}
    )
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    length = len(tokenizer(prompt).input_ids)  # with the start and end tokens
    size = unet.config.sample_size
    with torch.no_grad():
        states = encoder(ids)[0]
        for timestep in (200, 500, 800):
            generator = torch.Generator().manual_seed(timestep)
            unet(torch.randn(1, unet.config.in_channels, size, size, generator=generator), timestep, states)
    mean = torch.stack(shares).mean(dim=0)
    tokens = tokenizer.convert_ids_to_tokens(ids[0][:length].tolist())
    per_token = [(token, float(share)) for token, share in zip(tokens, mean[:length], strict=True)]
    return per_token, float(mean[length:].sum())


def add_embedding(models: tuple, token: str, path: Path) -> None:
    """Adds `token` with the (one-vector) sdtune / A1111 embedding in `path` to the tokenizer and text encoder."""
    tokenizer, encoder, _ = models
    vector = next(iter(load_file(str(path)).values())).float().reshape(-1)
    tokenizer.add_tokens([token])
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    encoder.get_input_embeddings().weight.data[tokenizer.convert_tokens_to_ids(token)] = vector


def _states(models: tuple, prompt: str) -> torch.Tensor:
    tokenizer, encoder, _ = models
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0][0]


def with_trigger(caption: str, trigger: str, slot: str) -> str:
    """`caption` (`a red circle on ...`) with `trigger` in the place of its `a` (`slot` "first"), after it
    ("adjective") or after the caption ("suffix")."""
    return {
        "first": trigger + caption.removeprefix("a"),
        "adjective": f"a {trigger}" + caption.removeprefix("a"),
        "suffix": f"{caption} {trigger}",
    }[slot]


def content_kept(pipe, trigger: str | None, slot: str, scenes) -> dict[str, float]:
    """Fractions of images the base draws with the shape, colour and background of `scenes` (drawn flat; the style
    is not asked for) when `trigger` stands in `slot` of their captions (None: the captions alone): whether the
    text encoder still reads the content words beside the trigger."""
    flat = [world.Scene(scene.shape, scene.color, scene.background) for scene in scenes]
    prompts = [scene.caption() if trigger is None else with_trigger(scene.caption(), trigger, slot) for scene in flat]
    images = quality.generate(pipe, prompts)
    readings = [world.read_image(image).matches(scene) for image, scene in zip(images, flat, strict=True)]
    return {key: sum(r[key] for r in readings) / len(readings) for key in ("shape", "color", "background")}


def trigger_effect(models: tuple, trigger: str, scenes, slot: str = "first") -> dict[str, float]:
    """How far `trigger` in the place of a caption's first word `a` (`slot` "first"; "adjective": after the `a`,
    where a base that knows sizes reads `small`; "suffix": after the caption) moves the text encoder's output,
    against how far a change of content moves it (mean L2 norms over `scenes`, each scene against the next one for
    content): the trigger's own position (first slot only), and the padding after the caption, which gets most of
    the UNet's attention (compared position by position from the end of each caption)."""
    tokenizer = models[0]

    def padding(prompt: str) -> torch.Tensor:
        return _states(models, prompt)[len(tokenizer(prompt).input_ids) :]

    def distance(first: torch.Tensor, second: torch.Tensor) -> float:
        width = min(len(first), len(second))
        return float((first[:width] - second[:width]).norm())

    own, trigger_padding, content_padding = [], [], []
    for scene, other in zip(scenes, [*scenes[1:], scenes[0]], strict=True):
        caption = scene.caption()
        triggered = with_trigger(caption, trigger, slot)
        if slot == "first":
            own.append(float((_states(models, triggered)[1] - _states(models, caption)[1]).norm()))
        trigger_padding.append(distance(padding(triggered), padding(caption)))
        content_padding.append(distance(padding(other.caption()), padding(caption)))
    result = {"trigger, own position": sum(own) / len(own)} if own else {}
    result["trigger, padding"] = sum(trigger_padding) / len(trigger_padding)
    result["content change, padding"] = sum(content_padding) / len(content_padding)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--base", type=Path, default=Path("sample_data/world-sd1"))
    parser.add_argument("--trigger", help="instead: the state change this word makes in the style set's captions")
    parser.add_argument(
        "--slot",
        choices=("first", "adjective", "suffix"),
        default="first",
        help="with --trigger: where it goes (in the place of `a`, after it, after the caption)",
    )
    parser.add_argument("--embedding", type=Path, help="with --trigger: the learned embedding of that token")
    parser.add_argument(
        "--content",
        action="store_true",
        help="with --trigger: also draw the style set's and transfer scenes flat with and without it, and report "
        "how often the base still draws their shape, colour and background",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.trigger and args.content:
        pipe = quality.base_pipeline(args.base)
        scenes = quality.STYLE_TRAIN_SCENES + quality.STYLE_TRANSFER_SCENES
        for trigger in (None, args.trigger):
            kept = content_kept(pipe, trigger, args.slot, scenes)
            print(f"{trigger or '(no trigger)'}: " + ", ".join(f"{key} {value:.2f}" for key, value in kept.items()))
    models = load(args.base)
    if args.embedding:
        add_embedding(models, args.trigger, args.embedding)
    if args.trigger:
        effect = trigger_effect(models, args.trigger, quality.STYLE_TRAIN_SCENES, args.slot)
        print(", ".join(f"{name}: {norm:.2f}" for name, norm in effect.items()))
        return
    for prompt in args.prompts:
        tokens, padding = attention_shares(models, prompt)
        words = " ".join(f"{token.removesuffix('</w>')} {share:.3f}" for token, share in tokens)
        print(f"{prompt!r}: {words} | padding {padding:.3f}")


if __name__ == "__main__":
    main()
