"""Auto-labeling: template and open_clip backends write metadata.csv that the trainer reads back; the tagger ranks
by the model's real similarities; existing captions and columns are kept."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdtune import cli, data, labeling
from sdtune.config import parse_config

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture
def folder(tmp_path) -> Path:
    target = tmp_path / "imgs"
    target.mkdir()
    for index, color in enumerate(("red", "green", "blue")):
        Image.new("RGB", (32, 32), color).save(target / f"img{index}.png")
    return target


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> dict[str, str]:
    """A tiny random open_clip model saved as a local checkpoint, with its config file."""
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    config = root / "tiny-test-clip.json"
    config.write_text(json.dumps(TINY_CLIP), encoding="utf-8")
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    torch.save(model.state_dict(), root / "tiny.pt")
    return {"config": str(config), "checkpoint": str(root / "tiny.pt"), "name": "tiny-test-clip"}


def _trainer_captions(folder: Path) -> dict[str, str]:
    config = parse_config({"method": "lora", "base_model": "m", "train_data_dir": str(folder), "resolution": 32})
    examples, errors = data.scan_dataset(config, None)
    assert errors == []
    return {e.image_path.name: e.caption for e in examples}


def test_template_backend_keeps_existing_captions_and_columns(folder, capsys):
    (folder / "metadata.csv").write_text("file_name,text,source\nimg1.png,my own words,me\n", encoding="utf-8")
    assert cli.main(["label", str(folder), "--trigger", "mychar", "--prefix", "photo"]) == 0
    assert "wrote 2 caption(s), kept 1 existing" in capsys.readouterr().out
    assert (folder / "metadata.csv").read_text(encoding="utf-8").splitlines() == [
        "file_name,text,source",
        'img0.png,"photo, a photo of mychar",',
        "img1.png,my own words,me",
        'img2.png,"photo, a photo of mychar",',
    ]
    assert _trainer_captions(folder)["img0.png"] == "photo, a photo of mychar"
    assert cli.main(["label", str(folder), "--template", "{trigger} toy", "--trigger", "robo", "--overwrite"]) == 0
    assert set(_trainer_captions(folder).values()) == {"robo toy"}


def test_openclip_tagger_ranks_by_the_models_similarities(folder, tiny_clip):
    import open_clip

    tags = ("red", "green", "blue", "cat", "dog", "car")
    tagger = labeling.OpenClipTagger(tiny_clip["name"], tiny_clip["checkpoint"], tags, top_k=3)
    images = [data.load_rgb(p) for p in sorted(folder.glob("*.png"))]
    scores = tagger.scores(images)

    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip["name"], pretrained=tiny_clip["checkpoint"])
    model.eval()
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(i) for i in images]))
        text = model.encode_text(open_clip.get_tokenizer(tiny_clip["name"])([f"a photo of {t}" for t in tags]))
    expected = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    captions = tagger.caption(images)
    for caption, row in zip(captions, expected, strict=True):
        assert caption.split(", ") == [tags[i] for i in row.argsort(descending=True)[:3].tolist()]
    above = labeling.OpenClipTagger(tiny_clip["name"], tiny_clip["checkpoint"], tags, top_k=6, threshold=1.1)
    assert above.caption(images[:1]) == [""]  # no cosine similarity reaches 1.1


def test_openclip_labels_through_the_cli_deterministically(folder, tiny_clip, tmp_path, capsys):
    vocabulary = tmp_path / "tags.txt"
    vocabulary.write_text("red\ngreen\nblue\ncat\n", encoding="utf-8")
    command = ["label", str(folder), "--backend", "openclip", "--model", tiny_clip["name"], "--model-config"]
    command += [tiny_clip["config"], "--pretrained", tiny_clip["checkpoint"], "--tags", str(vocabulary)]
    command += ["--top-k", "2", "--trigger", "mychar", "--overwrite"]
    assert cli.main(command) == 0
    out = capsys.readouterr().out
    assert "wrote 3 caption(s)" in out and "mychar (3)" in out.splitlines()[1]
    first = (folder / "metadata.csv").read_text(encoding="utf-8")
    captions = _trainer_captions(folder)
    assert all(c.startswith("mychar, ") and len(c.split(", ")) == 3 for c in captions.values())
    assert cli.main(command) == 0
    assert (folder / "metadata.csv").read_text(encoding="utf-8") == first


def test_label_errors_and_the_tools_script(folder, tmp_path, monkeypatch, capsys):
    assert cli.main(["label", str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err
    (folder / "metadata.csv").write_text("image,text\n", encoding="utf-8")
    assert cli.main(["label", str(folder)]) == 2
    assert "has no file_name column" in capsys.readouterr().err
    assert cli.main(["label", str(folder), "--backend", "openclip"]) == 2
    assert "needs --model" in capsys.readouterr().err
    (folder / "metadata.csv").unlink()
    script = Path(__file__).resolve().parents[2] / "tools" / "auto_label.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(folder), "--trigger", "zz"])
    with pytest.raises(SystemExit) as exit_code:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_code.value.code == 0 and set(_trainer_captions(folder).values()) == {"a photo of zz"}


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A tiny random BLIP captioner (model + processor with a 13-word vocabulary) saved as a local folder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    root = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "red", "square", "photo", "of", "blue", "cat"]
    (root / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    text = dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    text |= dict(intermediate_size=37, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0, sep_token_id=3)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config={**vision, "patch_size": 8})
    ).save_pretrained(root)
    tokenizer = BertTokenizer(str(root / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(root)
    return root


def test_blip_backend_writes_the_models_greedy_captions(folder, tiny_blip, capsys):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor, model = (
        BlipProcessor.from_pretrained(tiny_blip),
        BlipForConditionalGeneration.from_pretrained(tiny_blip),
    )
    images = [data.load_rgb(p) for p in sorted(folder.glob("*.png"))]
    with torch.no_grad():
        ids = model.eval().generate(
            **processor(images=images, return_tensors="pt"), max_new_tokens=30, do_sample=False
        )
    expected = [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]
    assert cli.main(["label", str(folder), "--backend", "blip", "--model", str(tiny_blip)]) == 0
    assert list(_trainer_captions(folder).values()) == expected
