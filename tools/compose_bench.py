"""Composition on the synthetic world: an identity embedding and a style LoRA, trained separately, stacked.

    python tools/compose_bench.py --identity output/quality_bench/purple_triangle-ti/ptri.safetensors \\
        --style output/quality_bench/hollow-lora/hollow.safetensors --out docs/quality/composition

Draws `a <ptri> on a <background> background in <hollow> style` on every background and reports the fraction of
images with the identity right (shape, colour, background), in the style, and both; stacked through sdtune's
`AdapterPipeline` (the style LoRA at `--sdtune-weight`, 1 by default) and through diffusers' own loaders
(`load_textual_inversion`, `load_lora_weights` + `set_adapters`), then with the style LoRA's weight swept (and, with
`--identity-lora` for a TI+LoRA identity, that LoRA's weight too; `--style-embedding` adds a TI+LoRA style's
embedding, whose learned token then triggers it).
Works on either world model (`--base sample_data/world-sdxl`: `StableDiffusionXLPipeline`, the embedding loaded
into both encoders). Writes `compose.json`, `compose.md` and a grid per route.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from sdtune.inference import AdapterPipeline
from world import quality

REPO_ROOT = Path(__file__).resolve().parent.parent


def diffusers_pipeline(args, style_weight: float, identity_weight: float):
    """The base with the identity and the style loaded by diffusers' own loaders (SD1 or SDXL pipeline), the LoRAs
    at the given weights."""
    pipe = quality.base_pipeline(args.base)
    quality.load_embedding(pipe, args.identity, args.identity_concept.placeholder)
    if args.style_embedding:
        quality.load_embedding(pipe, args.style_embedding, args.style_concept.placeholder)
    names, weights = ["style"], [style_weight]
    pipe.load_lora_weights(str(args.style), adapter_name="style")
    if args.identity_lora:
        pipe.load_lora_weights(str(args.identity_lora), adapter_name="identity")
        names, weights = names + ["identity"], weights + [identity_weight]
    pipe.set_adapters(names, adapter_weights=weights)
    return pipe


def sdtune_images(args, prompts: list[str]) -> list:
    """The same stack through sdtune's `AdapterPipeline` (compatibility gates included), the style LoRA at
    `--sdtune-weight`."""
    pipe = AdapterPipeline.from_base(args.base)
    pipe.add_embedding(args.identity, token=args.identity_concept.placeholder)
    pipe.add_lora(args.style, name="style", weight=args.sdtune_weight)
    if args.style_embedding:
        pipe.add_embedding(args.style_embedding, token=args.style_concept.placeholder)
    if args.identity_lora:
        pipe.add_lora(args.identity_lora, name="identity")
    seeds = list(range(len(prompts)))
    return pipe.generate(prompts, seeds, steps=quality.SAMPLER_STEPS, guidance=quality.GUIDANCE)


def rows(args) -> list[dict]:
    """One row per route and weight pair: both / identity / style fractions."""
    method = "ti+lora" if args.style_embedding else "lora"
    scenes, prompts = quality.composition_scenes(args.identity_concept, args.style_concept, method)
    images = sdtune_images(args, prompts)
    quality.save_grid(images, args.out / "compose-sdtune.png", columns=8)
    result = [{"route": "sdtune AdapterPipeline", "style_weight": args.sdtune_weight, "identity_weight": 1.0}]
    result[0].update(quality.composition_scores(images, scenes))
    identity_weights = args.weights if args.identity_lora else [1.0]
    for identity_weight in identity_weights:
        for style_weight in [0.0, *args.weights]:
            images = quality.generate(diffusers_pipeline(args, style_weight, identity_weight), prompts)
            if style_weight == args.sdtune_weight and identity_weight == 1.0:  # the same stack as compose-sdtune
                quality.save_grid(images, args.out / "compose-diffusers.png", columns=8)
            row = {"route": "diffusers loaders", "style_weight": style_weight, "identity_weight": identity_weight}
            result.append({**row, **quality.composition_scores(images, scenes)})
            print(json.dumps(result[-1]), flush=True)
    return result


def markdown_table(result: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| route | identity weight | style LoRA weight | identity and style | identity right | in the style |",
        "|---|---|---|---|---|---|",
    ]
    for r in result:
        lines.append(
            f"| {r['route']} | {r['identity_weight']:.2f} | {r['style_weight']:.2f} | {r['both']:.2f} | "
            f"{r['identity']:.2f} | {r['style']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=REPO_ROOT / "sample_data" / "world-sd1")
    parser.add_argument("--identity", type=Path, required=True, help="the identity's embedding (.safetensors)")
    parser.add_argument("--identity-concept", default="purple_triangle", help="which world concept it names")
    parser.add_argument("--identity-lora", type=Path, help="the identity's LoRA, for a TI+LoRA identity")
    parser.add_argument("--style", type=Path, required=True, help="the style LoRA (.safetensors)")
    parser.add_argument("--style-embedding", type=Path, help="the style's embedding, for a TI+LoRA style")
    parser.add_argument(
        "--style-concept",
        default="hollow",
        help="which world style it draws (hollow_adjective: trigger after `a`; hollow_suffix: after the caption)",
    )
    parser.add_argument("--weights", default="0.5,0.75,1.0", help="LoRA weights to sweep")
    parser.add_argument(
        "--sdtune-weight", type=float, default=1.0, help="the style LoRA's weight on the AdapterPipeline route"
    )
    parser.add_argument("--per-background", type=int, default=quality.SEEDS_PER_BACKGROUND)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "quality" / "composition")
    args = parser.parse_args(argv)
    problems = [
        f"--{k}: {getattr(args, k)} is not a file" for k in ("identity", "style") if not getattr(args, k).is_file()
    ]
    for name in ("identity_lora", "style_embedding"):
        if getattr(args, name) and not getattr(args, name).is_file():
            problems.append(f"--{name.replace('_', '-')}: {getattr(args, name)} is not a file")
    raw_weights = args.weights
    try:
        args.weights = [float(w) for w in raw_weights.split(",")]
        if not all(math.isfinite(w) for w in args.weights):
            raise ValueError
    except ValueError:
        problems.append(
            f"--weights: {raw_weights!r} is not a comma-separated list of finite numbers (e.g. 0.5,0.75,1.0)"
        )
    if not math.isfinite(args.sdtune_weight):
        problems.append(f"--sdtune-weight: {args.sdtune_weight} is not a finite number; give e.g. 0.75")
    names = [c.name for c in quality.CONCEPTS]
    if args.identity_concept not in names:
        problems.append(f"--identity-concept: {args.identity_concept} unknown; choose from {', '.join(names)}")
    styles = [c.name for c in quality.STYLES]
    if args.style_concept not in styles:
        problems.append(f"--style-concept: {args.style_concept} unknown; choose from {', '.join(styles)}")
    if problems:
        parser.error("; ".join(problems))
    args.identity_concept = quality.concept_by_name(args.identity_concept)
    args.style_concept = quality.concept_by_name(args.style_concept)
    return args


def main() -> None:
    """Measures the composition rows and writes them."""
    args = _arguments()
    quality.SEEDS_PER_BACKGROUND = args.per_background
    args.out.mkdir(parents=True, exist_ok=True)
    result = rows(args)
    (args.out / "compose.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (args.out / "compose.md").write_text(markdown_table(result), encoding="utf-8")
    print(markdown_table(result))


if __name__ == "__main__":
    main()
