"""AdapterPipeline: stacked LoRAs and embeddings equal the reference computed from the files, fused and unfused;
third-party layouts load; every compatibility gate refuses with its message and leaves the pipeline untouched."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from adapters_factory import a1111_embedding, apply_reference, kohya_lora
from safetensors.torch import save_file

from sdtune import compat, inference, models
from sdtune.compat import IncompatibleArtifactError
from sdtune.formats import FormatError

TOKEN = "myemb"


@pytest.fixture
def pipe(tiny_base):
    return inference.AdapterPipeline.from_base(tiny_base["folder"])


def _inputs(width: int = 32):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, width, generator=generator)
    return latents, context


def _outputs(unet, text_encoder, ids):
    latents, context = _inputs()
    with torch.no_grad():
        return unet(latents, 10, encoder_hidden_states=context).sample, text_encoder(ids)[0]


def _reference_with_embedding(base, stack, ids_of_tokens, vectors):
    unet, text_encoder = apply_reference(base, stack)
    text_encoder.resize_token_embeddings(max(ids_of_tokens) + 1)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[ids_of_tokens] = vectors
    return unet, text_encoder


def test_two_loras_and_an_embedding_equal_the_reference_fused_and_unfused(pipe, tiny_base, tmp_path):
    base = models.load_base_model(tiny_base["folder"])  # untouched copy for the reference
    factors_a = kohya_lora(base, tmp_path / "a.safetensors", seed=1)
    factors_b = kohya_lora(base, tmp_path / "b.safetensors", seed=2, alpha=2.0)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    a1111_embedding(tmp_path / f"{TOKEN}.pt", vectors)

    pipe.add_lora(tmp_path / "a.safetensors", weight=0.7)
    pipe.add_lora(tmp_path / "b.safetensors", text_encoder_weight=-0.4, unet_weight=1.3)
    pipe.add_embedding(tmp_path / f"{TOKEN}.pt")  # token = file stem, as in A1111
    ids = pipe.pipe.tokenizer(f"a {TOKEN} {TOKEN}_1 photo", return_tensors="pt").input_ids
    new_ids = pipe.pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    stack = [(factors_a, 0.7, 0.7), (factors_b, -0.4, 1.3)]
    expected = _outputs(*_reference_with_embedding(base, stack, new_ids, vectors), ids)

    for fused in (False, True):
        pipe.fuse(fused)
        pipe.apply()
        assert pipe.fused == fused
        for got, want in zip(_outputs(pipe.pipe.unet, pipe.pipe.text_encoder, ids), expected, strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)

    pipe.set_weight("a", 0.25)  # a change unfuses, re-weights, and fuses again at the next apply
    pipe.apply()
    assert pipe.fused
    expected = _outputs(*_reference_with_embedding(base, [(factors_a, 0.25, 0.25), stack[1]], new_ids, vectors), ids)
    for got, want in zip(_outputs(pipe.pipe.unet, pipe.pipe.text_encoder, ids), expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_removing_everything_gives_back_the_base(pipe, tiny_base, tmp_path):
    base = models.load_base_model(tiny_base["folder"])
    kohya_lora(base, tmp_path / "a.safetensors", seed=1)
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "kohya_emb.safetensors"))
    ids = pipe.pipe.tokenizer("a red photo", return_tensors="pt").input_ids
    expected = _outputs(base.unet, base.text_encoder, ids)
    vocabulary = len(pipe.pipe.tokenizer)
    pipe.add_lora(tmp_path / "a.safetensors")
    pipe.add_embedding(tmp_path / "kohya_emb.safetensors")
    pipe.fuse()
    pipe.apply()
    assert not torch.allclose(_outputs(pipe.pipe.unet, pipe.pipe.text_encoder, ids)[0], expected[0])
    pipe.remove("a")
    pipe.remove("kohya_emb")
    pipe.apply()
    assert len(pipe.pipe.tokenizer) == vocabulary and pipe.adapters == {}
    for got, want in zip(_outputs(pipe.pipe.unet, pipe.pipe.text_encoder, ids), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prompt_tag_loras_apply_only_to_their_generation(pipe, tiny_base, tmp_path):
    kohya_lora(models.load_base_model(tiny_base["folder"]), tmp_path / "a.safetensors", seed=1)
    pipe.add_lora(tmp_path / "a.safetensors", active=False)  # loaded, applied only when a prompt names it
    plain = pipe.generate(["a photo"], seeds=[4], steps=3, width=32, height=32)[0]
    tagged = pipe.generate(["a photo"], seeds=[4], steps=3, width=32, height=32, extra_loras={"a": (1.0, 1.0)})[0]
    again = pipe.generate(["a photo"], seeds=[4], steps=3, width=32, height=32)[0]
    assert plain.tobytes() != tagged.tobytes()
    assert plain.tobytes() == again.tobytes()


@pytest.mark.parametrize(
    "layout", ["a1111-pt", "emb_params", "diffusers-single-key"], ids=["a1111_pt", "kohya_emb_params", "diffusers"]
)
def test_third_party_embedding_layouts_load_their_vectors(pipe, tmp_path, layout):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    if layout == "a1111-pt":
        path = tmp_path / "mystyle.pt"
        a1111_embedding(path, vectors, name="something-else")
    elif layout == "emb_params":
        path = tmp_path / "mystyle.safetensors"
        save_file({"emb_params": vectors}, str(path))
    else:
        path = tmp_path / "mystyle.safetensors"
        save_file({"<mystyle>": vectors}, str(path))
    adapter = pipe.add_embedding(path)
    assert adapter.tokens == ("mystyle", "mystyle_1", "mystyle_2")
    ids = pipe.pipe.tokenizer.convert_tokens_to_ids(list(adapter.tokens))
    torch.testing.assert_close(pipe.pipe.text_encoder.get_input_embeddings().weight[ids], vectors)


def _snapshot(pipe):
    state = {f"unet.{k}": v.clone() for k, v in pipe.pipe.unet.state_dict().items()}
    state |= {f"te.{k}": v.clone() for k, v in pipe.pipe.text_encoder.state_dict().items()}
    return state, len(pipe.pipe.tokenizer), pipe.pipe.get_list_adapters()


def _assert_untouched(pipe, snapshot):
    state, vocabulary, adapters = _snapshot(pipe)
    assert vocabulary == snapshot[1] and adapters == snapshot[2] and pipe.adapters == {}
    assert state.keys() == snapshot[0].keys()
    assert all(torch.equal(state[k], snapshot[0][k]) for k in state)


def _other_base_record(base) -> dict[str, str]:
    record = compat.base_record(base)
    return record | {"sdtune.base_model_sha256": "f" * 64, "sdtune.base_model_name": "another-finetune"}


GATES = {
    "unknown_module": (
        lambda base, path: save_file(
            {
                f"{UNET_UNKNOWN}.lora_down.weight": torch.ones(2, 64),
                f"{UNET_UNKNOWN}.lora_up.weight": torch.ones(64, 2),
            },
            str(path),
        ),
        "1 key(s) name no module of the base model: lora_unet_down_blocks_7",
    ),
    "wrong_shape": (
        lambda base, path: save_file(
            {f"{TE_Q}.lora_down.weight": torch.ones(2, 768), f"{TE_Q}.lora_up.weight": torch.ones(32, 2)}, str(path)
        ),
        "do not fit the module's weight (32, 32)",
    ),
    "other_family": (
        lambda base, path: kohya_lora(base, path, 0, metadata={"ss_base_model_version": "sdxl_base_v1-0"}),
        "made for SDXL base, the base is Stable Diffusion 1.x",
    ),
    "embedding_width": (
        lambda base, path: save_file({"emb_params": torch.ones(1, 768)}, str(path)),
        "embedding width 768, the base's text encoder takes 32",
    ),
    "other_checkpoint": (
        lambda base, path: kohya_lora(base, path, 0, metadata=_other_base_record(base)),
        "trained on another-finetune (sha256 ffffffffff)",
    ),
    "other_tokenizer": (
        lambda base, path: save_file(
            {"emb_params": torch.ones(1, 32)},
            str(path),
            metadata=compat.base_record(base) | {"sdtune.tokenizer_fingerprint": "0" * 16},
        ),
        "trained with a different tokenizer",
    ),
}
UNET_UNKNOWN = "lora_unet_down_blocks_7_attentions_0_proj_in"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.mark.parametrize("gate", list(GATES))
def test_each_gate_refuses_with_its_reason_and_leaves_the_pipeline_untouched(pipe, tiny_base, tmp_path, gate):
    base = models.load_base_model(tiny_base["folder"])
    path = tmp_path / "zqgate.safetensors"
    GATES[gate][0](base, path)
    snapshot = _snapshot(pipe)
    add = pipe.add_embedding if gate in ("embedding_width", "other_tokenizer") else pipe.add_lora
    with pytest.raises(IncompatibleArtifactError) as error:
        add(path)
    message = str(error.value)
    assert GATES[gate][1] in message and str(path) in message
    assert "Ways out: load the base model it was made for" in message and "re-train it on this base" in message
    assert "The pipeline was left unchanged." in message
    forceable = gate in ("other_checkpoint", "other_tokenizer")
    assert ("--force" in message) == forceable
    _assert_untouched(pipe, snapshot)
    if forceable:
        adapter = add(path, force=True)
        assert adapter.warnings and GATES[gate][1] in adapter.warnings[0]


def test_the_record_of_the_same_base_fits_without_force(pipe, tiny_base, tmp_path):
    base = models.load_base_model(tiny_base["folder"])
    kohya_lora(base, tmp_path / "ours.safetensors", 0, metadata=compat.base_record(base))
    assert pipe.add_lora(tmp_path / "ours.safetensors").warnings == []


def test_names_and_kinds_are_checked(pipe, tiny_base, tmp_path):
    base = models.load_base_model(tiny_base["folder"])
    kohya_lora(base, tmp_path / "a.safetensors", 0)
    save_file({"emb_params": torch.ones(1, 32)}, str(tmp_path / "red.safetensors"))
    with pytest.raises(FormatError, match="is a lora, not a embedding; load it with add_lora"):
        pipe.add_embedding(tmp_path / "a.safetensors")
    with pytest.raises(FormatError, match="'red' is already in the tokenizer's vocabulary"):
        pipe.add_embedding(tmp_path / "red.safetensors")
    pipe.add_lora(tmp_path / "a.safetensors")
    with pytest.raises(FormatError, match="an adapter named 'a' is already loaded"):
        pipe.add_lora(tmp_path / "a.safetensors")
    with pytest.raises(KeyError, match="no LoRA named 'b' is loaded \\(loaded LoRAs: a\\)"):
        pipe.set_weight("b", 0.5)


def test_a_file_diffusers_would_load_partly_is_refused(pipe, tiny_base, tmp_path):
    """diffusers only logs the text-encoder keys it cannot place (q_proj without out_proj): sdtune refuses."""
    base = models.load_base_model(tiny_base["folder"])
    kohya_lora(base, tmp_path / "q_only.safetensors", 0, names=(TE_Q, "lora_te_text_model_encoder_layers_1_mlp_fc1"))
    snapshot = _snapshot(pipe)
    with pytest.raises(FormatError, match="diffusers' LoRA loader left 1 of 2 modules unapplied"):
        pipe.add_lora(tmp_path / "q_only.safetensors")
    _assert_untouched(pipe, snapshot)


def test_our_trained_files_load_on_their_base_and_need_force_elsewhere(ti_config_dict, tiny_base, tmp_path):
    from sdtune.config import parse_config
    from sdtune.train import fit, setup

    raw = {k: v for k, v in ti_config_dict.items() if k != "num_vectors"}
    raw |= {"method": "ti+lora", "lora_rank": 2, "max_steps": 2, "train_text_encoder": True}
    out = fit(setup(parse_config(raw))).final_path.parent  # trained on the single-file checkpoint
    on_checkpoint = inference.AdapterPipeline.from_base(tiny_base["checkpoint"])
    assert on_checkpoint.add_embedding(out / "star.safetensors", token="<star>").warnings == []
    lora = on_checkpoint.add_lora(out / "star_lora.safetensors")
    assert lora.warnings == [] and set(lora.components) == {"unet", "text_encoder"}
    on_folder = inference.AdapterPipeline.from_base(tiny_base["folder"])  # same weights, another file
    with pytest.raises(IncompatibleArtifactError, match="trained on tiny-sd1 \\(sha256 .*\\), this base is tiny-sd1"):
        on_folder.add_lora(out / "star_lora.safetensors")
    assert on_folder.add_lora(out / "star_lora.safetensors", force=True).warnings


def test_images_are_the_pixels_the_pipeline_gives(pipe):
    """`generate` reads the decoded floats to check them, then rounds them to uint8 as diffusers does."""
    ours = pipe.generate(["a photo", "a cat"], seeds=[4, 5], steps=2, width=32, height=32)
    generators = [torch.Generator().manual_seed(seed) for seed in (4, 5)]
    theirs = pipe.pipe(["a photo", "a cat"], num_inference_steps=2, width=32, height=32, generator=generators).images
    assert [np.asarray(image).tobytes() for image in ours] == [np.asarray(image).tobytes() for image in theirs]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_an_image_decoded_to_non_finite_pixels_is_refused(pipe, value):
    """NaN would be an all-black PNG; infinity is clamped to 0 or 1 by diffusers before the pixels come back, so it is
    caught at the decoder's output."""
    with torch.no_grad():
        pipe.pipe.vae.decoder.conv_out.bias[0] = value  # a broken VAE: every pixel's red channel
    with pytest.raises(inference.NonFiniteImageError) as error:
        pipe.generate(["a photo", "a cat"], seeds=[4, 5], steps=2, width=32, height=32)
    message = str(error.value)
    assert "prompt 'a photo' (seed 4); prompt 'a cat' (seed 5): the decoded pixels are NaN or infinite" in message
    assert "nothing was saved for them" in message and "float16 VAE" in message and "LoRA or embedding" in message
    assert error.value.images == [None, None]


def test_only_the_non_finite_image_of_a_batch_is_refused(pipe):
    def break_second(module, inputs, output):
        output[1, :, 0, 0] = float("nan")

    hook = pipe.pipe.vae.decoder.register_forward_hook(break_second)
    try:
        with pytest.raises(inference.NonFiniteImageError, match=r"^prompt 'a cat' \(seed 5\): the decoded") as error:
            pipe.generate(["a photo", "a cat"], seeds=[4, 5], steps=2, width=32, height=32)
    finally:
        hook.remove()
    good, bad = error.value.images
    assert bad is None and good.size == (32, 32)
    assert np.array_equal(
        np.asarray(good), np.asarray(pipe.generate(["a photo"], [4], steps=2, width=32, height=32)[0])
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"width": 30}, "`width` 30 is not a multiple of 8"),
        ({"width": 0}, "`width` 0 is outside 8..8192"),
        ({"guidance": float("nan")}, "`guidance` nan is not a finite number"),
        ({"steps": 0}, "`steps` 0 is outside 1..1000"),
        ({"seeds": [2**64]}, "seed 18446744073709551616 is outside -2**63..2**64-1"),
        ({"clip_skip": 6}, "clip_skip 6 is outside 1..5, the text encoder's layers"),
    ],
)
def test_settings_that_cannot_be_drawn_are_refused_before_sampling(pipe, settings, message):
    arguments = {"seeds": [1], "steps": 2, "width": 32, "height": 32, **settings}
    with pytest.raises(inference.SettingError, match=re.escape(message)):
        pipe.generate(["a photo"], **arguments)
