"""Prompt syntax: A1111 `<lora:...>` tags and embedding stems, ComfyUI `embedding:NAME`, resolved against folders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdtune import prompts
from sdtune.prompts import AdapterLibrary, PromptError, parse_prompt


def test_lora_tags_are_taken_out_with_their_weights():
    parsed = parse_prompt("a <lora:red_star:0.8> photo, <lora:style:1:0.5> detailed <lora:plain> <lora:x:te=0.2>")
    assert parsed.text == "a photo, detailed"
    assert parsed.loras == {"red_star": (0.8, 0.8), "style": (1.0, 0.5), "plain": (1.0, 1.0), "x": (0.2, 1.0)}


def test_embeddings_by_stem_and_comfyui_syntax():
    parsed = parse_prompt("a myemb cat, embedding:other and myembx not", ["myemb", "other"])
    assert parsed.text == "a myemb cat, other and myembx not"
    assert sorted(parsed.embeddings) == ["myemb", "other"]
    assert parse_prompt("<lora:a:1>, a dog", ["dog-style"]).text == "a dog"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<lora:a:heavy>", "'heavy' is not a number"),
        ("<lora:a:1:1:1>", "sdtune reads a weight, or text-encoder and UNet weights"),
        ("<lora:a:dyn=4>", "sdtune reads a weight"),
        ("<lora::1>", "the LoRA name is empty"),
        ("<lora:a:1> <lora:a:0.5>", "names <lora:a> twice"),
        ("<lora:a:nan>", "a weight must be a finite number"),
        ("<lora:a:1:inf>", "a weight must be a finite number"),
        ("<lora:a:te=-inf>", "a weight must be a finite number"),
    ],
)
def test_malformed_tags_are_errors(prompt, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt(prompt)


def test_library_resolves_stems_and_output_names(tmp_path):
    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    (loras / "sub").mkdir(parents=True)
    embeddings.mkdir()
    factors = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}
    save_file(factors, str(loras / "red_star-v3.safetensors"), metadata={"ss_output_name": "red_star"})
    save_file(factors, str(loras / "sub" / "style.safetensors"))
    save_file({"emb_params": torch.zeros(1, 4)}, str(embeddings / "myemb.safetensors"))
    library = AdapterLibrary([loras], [embeddings])
    assert library.lora("red_star") == library.lora("red_star-v3") == loras / "red_star-v3.safetensors"
    assert library.lora("style") == loras / "sub" / "style.safetensors"
    assert library.embedding("myemb") == embeddings / "myemb.safetensors"
    with pytest.raises(PromptError, match="no such file is known. Did you mean 'red_star'"):
        library.lora("red_stra")
    save_file(factors, str(loras / "red_star.safetensors"))
    with pytest.raises(PromptError, match="LoRA name 'red_star' is ambiguous"):
        AdapterLibrary([loras]).lora("red_star")
    with pytest.raises(prompts.FormatError, match="does not exist"):
        AdapterLibrary([tmp_path / "missing"])


def test_training_states_and_other_files_are_not_listed_as_loras_or_embeddings(tmp_path):
    """`--lora-dir output` lists the LoRAs of a run, not the weights of its resumable training states (`state/`),
    an unfinished write (a hidden folder) or an embedding; files are told apart by their keys, not their names."""
    factors = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}
    peft = {"unet.x.lora_A.weight": torch.zeros(1, 2), "unet.x.lora_B.weight": torch.zeros(2, 1)}
    output = tmp_path / "output"
    for step in ("state/step-00000040", "state/step-00000080", ".step-00000120.tmp99"):
        (output / step).mkdir(parents=True)
        save_file(
            {"lora.0": torch.zeros(2, 2), "lora.1": torch.zeros(2, 2)}, str(output / step / "trainable.safetensors")
        )
        save_file(factors, str(output / step / "looks_like_a_lora.safetensors"))
        (output / step / "state.json").write_text("{}", encoding="utf-8")
    (output / ".step-00000120.tmp99" / "state.json").unlink()  # a state being written: not yet marked
    save_file(factors, str(output / "run.safetensors"))
    save_file(peft, str(output / "pytorch_lora_weights.safetensors"))
    save_file({"emb_params": torch.zeros(1, 4)}, str(output / "myemb.safetensors"))
    library = AdapterLibrary([output], [output])
    assert sorted(library.loras) == ["pytorch_lora_weights", "run"]
    assert sorted(library.embeddings) == ["myemb"]
    with pytest.raises(PromptError, match=r"myemb.safetensors holds no LoRA \(its keys are no kohya or diffusers"):
        library.lora("myemb")
    with pytest.raises(PromptError, match="no such file is known"):
        library.lora("trainable")
