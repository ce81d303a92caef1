"""SDXL on a tiny in-code model: both text encoders, the added conditioning, TI, LoRA (UNet + TE1 + TE2, LoCon,
TI+LoRA) reloaded through diffusers' SDXL loaders, continuing from other trainers' files, and the SDXL rules."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune import compat, data, families, formats, models, preflight
from sdtune.config import ConfigError, parse_config
from sdtune.train import fit, setup, train

PROMPT = "a red <star> on a blue background"


@pytest.fixture
def sdxl_dict(tiny_sdxl, tmp_path) -> dict:
    """A small LoRA config on the tiny SDXL single file (fp32 saves, so reloads compare exactly)."""
    from conftest import SAMPLE_DATA

    return {
        "method": "lora", "base_model": str(tiny_sdxl["checkpoint"]), "train_data_dir": str(SAMPLE_DATA),
        "resolution": 32, "batch_size": 2, "max_steps": 3, "learning_rate": 5e-2, "lora_rank": 4, "lora_alpha": 2,
        "save_precision": "fp32", "output_dir": str(tmp_path / "out"), "seed": 3,
    }  # fmt: skip


def _pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["folder"])


def _outputs(parts: dict, unet, text: str = "a red star on a blue background"):
    """(context, pooled, UNet prediction) of a prompt, with fixed latents and time ids."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[40.0, 56.0, 4.0, 0.0, 32.0, 32.0]])
    with torch.no_grad():
        conditioning = models.encode_text(families.SDXL, parts, [text], "cpu")
        extra = models.added_conditioning(families.SDXL, conditioning.pooled, time_ids)
        prediction = unet(latents, torch.tensor([321]), conditioning.states, **extra).sample
    return conditioning.states, conditioning.pooled, prediction


def test_tiny_sdxl_folder_and_single_file_load_identically(tiny_sdxl):
    folder, single = models.load_base_model(tiny_sdxl["folder"]), models.load_base_model(tiny_sdxl["checkpoint"])
    assert folder.family is single.family is families.SDXL
    assert single.text_widths == (32, 64) and list(single.tokenizers) == ["tokenizer", "tokenizer_2"]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = folder.components[name].state_dict(), single.components[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ids = single.tokenizers["tokenizer_2"]("a cat", padding="max_length", max_length=77).input_ids
    assert ids[3:5] == [49407, 0]  # OpenCLIP's tokenizer pads with "!" (id 0) after the end-of-text token
    keys = models.read_checkpoint_header(tiny_sdxl["checkpoint"])[0]
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert keys["conditioner.embedders.1.model.text_projection"] == (64, 64)
    assert "model.diffusion_model.label_emb.0.0.weight" in keys


def test_context_is_both_penultimate_states_and_pooled_is_at_the_first_end_token(tiny_sdxl):
    base = models.load_base_model(tiny_sdxl["folder"])
    conditioning = models.encode_text(base.family, base.components, ["a cat", "a red house on a hill"], "cpu")
    states, pooled = [], None
    for spec in base.family.text_encoders:
        tokenizer, encoder = base.tokenizers[spec.tokenizer], base.text_encoders[spec.component]
        ids = tokenizer(["a cat", "a red house on a hill"], padding="max_length", max_length=77, return_tensors="pt")
        output = encoder(ids.input_ids, output_hidden_states=True)
        states.append(output.hidden_states[-2])  # penultimate layer, no final LayerNorm
        if spec.pooled:
            first_end = [row.index(49407) for row in ids.input_ids.tolist()]
            pooled = encoder.text_projection(output.last_hidden_state[[0, 1], first_end])
    torch.testing.assert_close(conditioning.states, torch.cat(states, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(conditioning.pooled, pooled, rtol=0, atol=0)
    assert conditioning.states.shape == (2, 77, 96) and conditioning.pooled.shape == (2, 64)


def test_time_ids_follow_the_image_bucket_crop_and_flip(tmp_path, sdxl_dict):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (100, 60), (200, 30, 30)).save(folder / "wide.png")
    raw = {**sdxl_dict, "train_data_dir": str(folder), "center_crop": False, "random_flip": True, "resolution": 32}
    config = parse_config(raw)
    examples, _ = data.scan_dataset(config, None)
    dataset = data.ImageCaptionDataset(examples, config, sizes=[(48, 16)])
    seen = {(float(t[2]), float(t[3])) for t in (dataset[(0, epoch)]["time_ids"] for epoch in range(12))}
    for top, left in seen:
        # 100x60 covers 48x16 at scale 0.48: 48x29, so 13 rows can be cropped, no columns
        assert left == 0 and 0 <= top <= 13
    assert len(seen) > 1  # random crops
    assert dataset[(0, 0)]["time_ids"][[0, 1, 4, 5]].tolist() == [60, 100, 16, 48]
    torch.testing.assert_close(
        data.time_ids((100, 60), (60, 36), (5, 2), (48, 32), flipped=True),  # 60 wide, crop 5..53: flipped left 7
        torch.tensor([60.0, 100.0, 2.0, 7.0, 32.0, 48.0]),
    )


def test_the_unet_receives_the_pooled_embedding_and_the_time_ids_computed_by_hand(sdxl_dict, tmp_path):
    from sdtune.train import _loss

    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (50, 40), (20, 90, 200)).save(folder / "a.png")
    (folder / "a.txt").write_text("a blue square")
    raw = {**sdxl_dict, "train_data_dir": str(folder), "batch_size": 1, "train_text_encoder": False}
    run = setup(parse_config(raw))
    received = {}

    def keep(module, args, kwargs):
        received.update(kwargs["added_cond_kwargs"], states=args[2])

    handle = run.base.unet.register_forward_pre_hook(keep, with_kwargs=True)
    batch = next(iter(run.loader))
    with torch.no_grad():
        _loss(batch, run, batch["caption"])
    handle.remove()
    # 50x40 covers 32x32 at scale 0.8: 40x32, centre crop 4 px from the left, none from the top
    assert received["time_ids"].tolist() == [[40.0, 50.0, 0.0, 4.0, 32.0, 32.0]]
    base = run.base
    ids = base.tokenizers["tokenizer_2"](["a blue square"], padding="max_length", max_length=77, return_tensors="pt")
    output = base.text_encoders["text_encoder_2"](ids.input_ids, output_hidden_states=True)
    pooled = base.text_encoders["text_encoder_2"].text_projection(output.last_hidden_state[0, 4])  # 3 words + BOS
    torch.testing.assert_close(received["text_embeds"][0], pooled, rtol=0, atol=0)
    assert received["states"].shape == (1, 77, 96)


@pytest.mark.parametrize(
    "variant",
    [{}, {"conv_rank": 2, "conv_alpha": 1, "train_text_encoder": False}, {"method": "ti+lora"}],
    ids=["unet-te1-te2", "locon", "ti+lora"],
)
def test_exported_sdxl_lora_reloads_in_diffusers_with_the_trained_outputs(sdxl_dict, tiny_sdxl, variant):
    raw = {**sdxl_dict, **variant}
    if variant.get("method") == "ti+lora":
        raw |= {"placeholder_token": "<star>", "init_word": "star"}
    run = setup(parse_config(raw))
    result = fit(run)
    text = PROMPT.replace("<star>", "star") if "placeholder_token" not in raw else PROMPT
    trained = _outputs(run.base.components, run.base.unet, text)
    pipe = _pipe(tiny_sdxl)
    pipe.load_lora_weights(str(result.final_path))
    if "placeholder_token" in raw:
        vectors = load_file(str(result.final_path.with_name("star.safetensors")))
        pipe.load_textual_inversion(
            vectors["clip_l"], token="<star>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            vectors["clip_g"], token="<star>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    reloaded = _outputs(pipe.components, pipe.unet, text)
    for ours, theirs in zip(trained, reloaded, strict=True):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    keys = load_file(str(result.final_path)).keys()
    prefixes = {key.split("_")[1] for key in keys}
    assert prefixes == ({"unet"} if variant.get("train_text_encoder") is False else {"unet", "te1", "te2"})
    assert not any("down_blocks" in key or "up_blocks" in key or "mid_block" in key for key in keys)  # LDM names only
    base = (
        _outputs(_pipe(tiny_sdxl).components, _pipe(tiny_sdxl).unet, text) if "placeholder_token" not in raw else None
    )
    if base is not None:
        assert not torch.allclose(base[2], trained[2], atol=1e-5)


def test_sdxl_files_carry_the_clients_metadata(sdxl_dict):
    result = train(
        parse_config({**sdxl_dict, "method": "ti+lora", "placeholder_token": "<star>", "init_word": "star"})
    )
    with safe_open(str(result.final_path), "pt") as handle:
        lora_metadata = handle.metadata()
    with safe_open(str(result.final_path.with_name("star.safetensors")), "pt") as handle:
        embedding = {key: handle.get_tensor(key).shape for key in handle.keys()}  # noqa: SIM118
        embedding_metadata = handle.metadata()
    assert embedding == {"clip_l": (1, 32), "clip_g": (1, 64)}
    expected = {
        "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.prediction_type": "epsilon", "modelspec.resolution": "32x32", "sdtune.model_family": "sdxl",
        "sdtune.text_encoder_width": "32,64",
    }  # fmt: skip
    assert {key: lora_metadata.get(key) for key in expected} == expected
    assert lora_metadata["sshs_model_hash"] and lora_metadata["sdtune.companion_embedding"] == "star.safetensors"
    assert embedding_metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"


def test_sdxl_embedding_loads_into_both_encoders_with_two_diffusers_calls(sdxl_dict, tiny_sdxl):
    raw = {**sdxl_dict, "method": "ti", "placeholder_token": "<star>", "init_word": "star", "num_vectors": 2}
    raw = {k: v for k, v in raw.items() if k not in ("lora_rank", "lora_alpha", "save_precision")}
    run = setup(parse_config(raw))
    fit(run)
    expanded = PROMPT.replace("<star>", "<star> <star>_1")
    trained = models.encode_text(run.base.family, run.base.components, [expanded], "cpu")
    vectors = load_file(str(run.config.output_dir + "/star.safetensors"))
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}
    pipe = _pipe(tiny_sdxl)
    tokens = ["<star>", "<star>_1"]
    pipe.load_textual_inversion(
        vectors["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        vectors["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    with torch.no_grad():
        reloaded = models.encode_text(
            families.SDXL, pipe.components, pipe.maybe_convert_prompt([PROMPT], pipe.tokenizer), "cpu"
        )
    torch.testing.assert_close(reloaded.states, trained.states.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(reloaded.pooled, trained.pooled.detach(), rtol=0, atol=1e-5)


def _diffusers_spellings(unet) -> dict[str, str]:
    """SDXL's kohya UNet names (LDM spelling) -> the diffusers spelling other trainers write."""
    return {
        formats.lora_key(families.SDXL, "unet", path, unet.config): formats.lora_key(families.SD1, "unet", path)
        for path in formats.adaptable_modules(unet)
    }


def test_continuing_from_a_diffusers_spelled_sdxl_file_starts_where_it_is(sdxl_dict, tmp_path):
    first = train(parse_config({**sdxl_dict, "train_text_encoder": False}))
    spellings = _diffusers_spellings(models.load_base_model(sdxl_dict["base_model"]).unet)
    tensors = load_file(str(first.final_path))
    renamed = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        renamed[f"{spellings[module]}.{suffix}"] = value
    spelled = tmp_path / "diffusers_spelled.safetensors"
    save_file(renamed, str(spelled), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    assert formats.read_artifact(spelled).family == "sdxl"
    base = models.load_base_model(sdxl_dict["base_model"])
    assert compat.check_fit(formats.read_artifact(spelled), base).fits
    raw = {k: v for k, v in sdxl_dict.items() if k not in ("lora_rank", "lora_alpha")}
    run = setup(parse_config({**raw, "network_weights": str(spelled), "output_dir": str(tmp_path / "c")}))
    from sdtune.methods import lora

    continued = lora.extract(base.family, run.base.adaptable())
    assert continued.keys() == {k.partition(".")[0] for k in tensors}  # written back in SDXL's own spelling
    for name, module in continued.items():
        torch.testing.assert_close(module.up, tensors[name + ".lora_up.weight"], rtol=0, atol=0)


def test_a_te2_attention_subset_is_refused_as_a1111_would_ignore_it(sdxl_dict, tmp_path):
    first = train(parse_config(sdxl_dict))
    tensors = load_file(str(first.final_path))
    partial = {k: v for k, v in tensors.items() if "te2_text_model_encoder_layers_1_self_attn_k_proj" not in k}
    path = tmp_path / "partial.safetensors"
    save_file(partial, str(path))
    raw = {k: v for k, v in sdxl_dict.items() if k not in ("lora_rank", "lora_alpha")}
    with pytest.raises(ConfigError, match="text_encoder_2 layer 1: attention LoRA on out, q, v only; A1111"):
        setup(parse_config({**raw, "network_weights": str(path), "output_dir": str(tmp_path / "c")}))


def test_sdxl_rules_clip_skip_resolution_and_markers(sdxl_dict, tiny_sdxl, tmp_path):
    with pytest.raises(ConfigError, match="clip_skip: 2, but SDXL base reads the penultimate layer"):
        preflight.preflight(parse_config({**sdxl_dict, "clip_skip": 2}))
    unresolved = parse_config({k: v for k, v in sdxl_dict.items() if k != "resolution"} | {"enable_bucket": True})
    resolved = preflight.resolved(unresolved)
    assert (resolved.resolution, resolved.min_bucket_reso, resolved.max_bucket_reso) == (1024, 512, 2048)
    marked = tmp_path / "vpred.safetensors"
    tensors, metadata = formats.read_safetensors(tiny_sdxl["checkpoint"])
    save_file({**tensors, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(marked), metadata=metadata)
    base = models.load_base_model(marked)
    assert base.prediction_type == "v_prediction" and base.scheduler_config["rescale_betas_zero_snr"] is True
    with pytest.raises(ConfigError, match="zero_terminal_snr: the last timestep is then pure noise"):
        setup(parse_config({**sdxl_dict, "zero_terminal_snr": True}))
    run = setup(parse_config({**sdxl_dict, "base_model": str(marked), "max_steps": 1}))
    assert run.noise_scheduler.config.prediction_type == "v_prediction"
    assert run.noise_scheduler.alphas_cumprod[-1] == 0  # zero terminal SNR
    result = fit(run)
    assert torch.isfinite(torch.tensor(result.last_loss))
    with safe_open(str(result.final_path), "pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "v"


def test_text_encoder_caches_hold_both_encoders_and_the_pooled_embedding(sdxl_dict, tmp_path):
    from sdtune.train import _cached_text, _text

    raw = {**sdxl_dict, "train_text_encoder": False, "max_steps": 2, "learning_rate": 1e-4}
    run = setup(parse_config({**raw, "cache_text_encoder_outputs": True}))
    captions = ["a cat", "a red house", "a cat"]
    fresh, cached = _text(run, captions, "cpu"), _cached_text(run, captions, "cpu")
    assert sorted(run.text_cache) == ["a cat", "a red house"]  # each distinct caption encoded once
    torch.testing.assert_close(cached.states, fresh.states, rtol=0, atol=1e-5)  # encoded in another batch
    torch.testing.assert_close(cached.pooled, fresh.pooled, rtol=0, atol=1e-5)
    plain = train(parse_config({**raw, "output_dir": str(tmp_path / "a")}))
    cached_run = train(parse_config({**raw, "output_dir": str(tmp_path / "b"), "cache_text_encoder_outputs": True}))
    a, b = load_file(str(plain.final_path)), load_file(str(cached_run.final_path))
    assert a.keys() == b.keys()
    for key in a:  # the same training; batch composition only rounds differently (Adam's steps are +-lr at most)
        torch.testing.assert_close(b[key], a[key], atol=3e-4, rtol=0)


def test_another_vae_replaces_the_base_one(sdxl_dict, tiny_sdxl, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl["folder"] / "vae")
    with torch.no_grad():
        for param in vae.parameters():
            param.mul_(0.5)
    vae.save_pretrained(tmp_path / "vae")
    save_file(vae.state_dict(), str(tmp_path / "vae.safetensors"))
    for source in (tmp_path / "vae", tmp_path / "vae.safetensors"):
        run = setup(parse_config({**sdxl_dict, "vae": str(source), "output_dir": str(tmp_path / source.name)}))
        got, expected = run.base.vae.state_dict(), vae.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    broken = tmp_path / "broken.safetensors"
    broken.write_text("not a VAE")
    with pytest.raises(models.ModelError, match="vae: .*broken.safetensors could not be read as a SDXL base VAE"):
        models.load_vae(broken, vae, families.SDXL)


def test_cross_family_files_are_refused_naming_both_families(sdxl_dict, tiny_base, tiny_sdxl):
    from adapters_factory import kohya_lora

    from sdtune.inference import AdapterPipeline

    sd1 = models.load_base_model(tiny_base["folder"])
    xl_pipe = AdapterPipeline.from_base(tiny_sdxl["checkpoint"])  # the base the files below are trained on
    result = train(
        parse_config({**sdxl_dict, "method": "ti+lora", "placeholder_token": "<star>", "init_word": "star"})
    )
    embedding = result.final_path.with_name("star.safetensors")
    on_sd1 = compat.check_fit(formats.read_artifact(result.final_path), sd1).blocking
    assert on_sd1[0] == "made for SDXL base, the base is Stable Diffusion 1.x"
    assert compat.check_fit(formats.read_artifact(embedding), sd1).blocking[0].startswith("made for SDXL base")
    sd1_lora = result.final_path.with_name("sd1.safetensors")
    kohya_lora(sd1, sd1_lora, seed=1, metadata={"ss_base_model_version": "sd_v1"})  # as kohya's SD1.x files say
    with pytest.raises(compat.IncompatibleArtifactError, match="made for Stable Diffusion 1.x, the base is SDXL base"):
        xl_pipe.add_lora(sd1_lora)
    assert xl_pipe.adapters == {} and not xl_pipe.pipe.get_list_adapters()
    sd1_embedding = result.final_path.with_name("sd1emb.safetensors")
    save_file({"emb_params": torch.zeros(1, 768)}, str(sd1_embedding))
    with pytest.raises(compat.IncompatibleArtifactError, match="made for Stable Diffusion 1.x"):
        xl_pipe.add_embedding(sd1_embedding)
    assert "sd1emb" not in xl_pipe.pipe.tokenizer.get_vocab()
    adapter = xl_pipe.add_embedding(embedding, token="<star>")
    assert adapter.tokens == ("<star>",)
    assert "<star>" in xl_pipe.pipe.tokenizer.get_vocab() and "<star>" in xl_pipe.pipe.tokenizer_2.get_vocab()


def test_inspect_reports_sdxl_files_of_other_trainers(tmp_path, capsys):
    from sdtune import cli

    save_file(
        {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280), "clip_l_out": torch.zeros(2, 768)},
        str(tmp_path / "onetrainer.safetensors"),
    )
    artifact = formats.read_artifact(tmp_path / "onetrainer.safetensors")
    assert (artifact.layout, artifact.family) == ("sdxl-pair", "sdxl")
    assert cli.main(["inspect", str(tmp_path / "onetrainer.safetensors"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vectors"] == {"clip_l": [2, 768], "clip_g": [2, 1280], "clip_l_out": [2, 768]}


def test_sdxl_sample_grid_is_drawn_again_by_sdtune_generate(sdxl_dict, tmp_path, capsys):
    """`sdtune generate` on SDXL (embedding into both encoders, LoRA with LDM names, the pooled embedding at the first
    end-of-text token) draws the training's last sample grid pixel for pixel."""
    import shlex

    import numpy as np

    from sdtune import cli, inference

    raw = {**sdxl_dict, "method": "ti+lora", "placeholder_token": "<star>", "init_word": "star", "max_steps": 2}
    raw |= {"sample_prompts": [PROMPT, "a cat"], "sample_steps": 3, "sample_guidance_scale": 3.0}
    result = train(parse_config(raw))
    assert cli.main([*shlex.split(result.samples_command)[1:], "--out", str(tmp_path / "again")]) == 0
    assert "wrote 2 file(s)" in capsys.readouterr().out
    drawn = [Image.open(path).convert("RGB") for path in sorted((tmp_path / "again").glob("*.png"))]
    with Image.open(tmp_path / "out" / "samples" / "step00000002.png") as grid:
        assert np.array_equal(np.asarray(grid.convert("RGB")), np.asarray(inference.image_grid(drawn, 2, scale=4)))
    manifest = [json.loads(line) for line in (tmp_path / "again" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["embeddings"][0]["name"] == "<star>" and manifest[0]["loras"][0]["name"] == "star_lora"
    command = ["generate", "--base", raw["base_model"], "--prompt", "a cat", "--out", str(tmp_path / "x")]
    assert cli.main([*command, "--clip-skip", "2"]) == 2
    assert "clip_skip 2, but SDXL base reads the penultimate layer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "precision",
    ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA"))],
)
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_sdxl_vae_stays_float32_only_in_fp16(sdxl_dict, precision):
    run = setup(parse_config({**sdxl_dict, "mixed_precision": precision, "train_text_encoder": False}))
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert run.base.unet.dtype == half
    assert run.base.vae.dtype == (torch.float32 if precision == "fp16" else half)  # SDXL's VAE overflows in fp16 only
