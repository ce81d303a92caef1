"""Auto-labeling: template and open_clip backends write metadata.csv that the trainer reads back; the tagger ranks
by the model's real similarities; existing captions and columns are kept. Labeling never touches the network: a hub
model is used from the local cache or refused at once with the way out, and every bad folder, model, image or option
is refused with a message that names it."""

from __future__ import annotations

import json
import runpy
import shutil
import socket
import sys
import time
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
    (tmp_path / "empty").mkdir()
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


@pytest.fixture
def offline(tmp_path, monkeypatch) -> list[str]:
    """No network (every connection attempt is recorded and fails) and an empty Hugging Face cache of our own."""
    import huggingface_hub

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return attempts


def _cache_repo(repo_id: str, files: dict[str, Path]) -> None:
    """Puts `files` into the (test's) Hugging Face cache as a downloaded snapshot of `repo_id` would be laid out."""
    import huggingface_hub

    root = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit, encoding="utf-8")
    (root / "snapshots" / commit).mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, root / "snapshots" / commit / name)


@pytest.mark.parametrize(
    ("command", "way_out"),
    [
        (["--backend", "openclip", "--model", "ViT-B-32", "--pretrained", "openai"], "--pretrained /path/to/"),
        (["--backend", "blip", "--model", "Salesforce/blip-image-captioning-base"], "--model /path/to/"),
        (["--backend", "openclip", "--model", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"], "local-dir:/path/to"),
    ],
)
def test_a_hub_model_not_on_this_machine_is_refused_at_once(folder, offline, command, way_out, capsys):
    import open_clip  # noqa: F401  (its import time is not what this measures)

    start = time.monotonic()
    assert cli.main(["label", str(folder), *command]) == 2
    assert time.monotonic() - start < 5 and offline == []
    err = capsys.readouterr().err
    assert command[-1] in err and "never downloads" in err and way_out in err and "hf download" in err
    assert "Traceback" not in err and not (folder / "metadata.csv").exists()


def test_a_hub_model_already_in_the_cache_loads_without_network(folder, tiny_clip, tiny_blip, offline, monkeypatch):
    import open_clip

    direct = labeling.OpenClipTagger(tiny_clip["name"], tiny_clip["checkpoint"], ("red", "green", "blue"), top_k=2)
    expected = direct.caption([data.load_rgb(p) for p in sorted(folder.glob("*.png"))])
    fake_tag = {"fake": {"url": "", "hf_hub": "sdtune-test/tiny-clip/", "mean": None, "std": None}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, tiny_clip["name"], fake_tag)
    _cache_repo("sdtune-test/tiny-clip", {"open_clip_pytorch_model.bin": Path(tiny_clip["checkpoint"])})
    tagger = labeling.OpenClipTagger(tiny_clip["name"], "fake", ("red", "green", "blue"), top_k=2)
    assert tagger.caption([data.load_rgb(p) for p in sorted(folder.glob("*.png"))]) == expected

    _cache_repo("sdtune-test/tiny-blip", {path.name: path for path in tiny_blip.iterdir()})
    assert cli.main(["label", str(folder), "--backend", "blip", "--model", "sdtune-test/tiny-blip"]) == 0
    assert len(_trainer_captions(folder)) == 3 and offline == []


@pytest.mark.parametrize(
    ("pretrained", "expected"),
    [
        ("missing/weights.bin", "no such file, and not a pretrained tag"),
        ("text", "cannot be loaded"),
        ("empty", "cannot be loaded"),
        (None, "needs --pretrained"),
    ],
)
def test_a_bad_pretrained_is_refused_naming_it(folder, tiny_clip, tmp_path, offline, pretrained, expected, capsys):
    command = ["label", str(folder), "--backend", "openclip", "--model", tiny_clip["name"]]
    if pretrained in ("text", "empty"):
        pretrained = str(tmp_path / f"{pretrained}.bin")
        Path(pretrained).write_text("not a checkpoint\n" if "text" in pretrained else "", encoding="utf-8")
    if pretrained:
        command += ["--pretrained", str(tmp_path / pretrained)]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert expected in err and (pretrained is None or str(tmp_path / pretrained) in err)
    assert "Traceback" not in err and offline == [] and not (folder / "metadata.csv").exists()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("empty", "has no config.json"),
        ("not-blip", "a 'clip' model, not BLIP"),
        ("no-weights", "cannot be loaded"),
        ("file", "is a file"),
        ("./missing-folder", "no such folder"),
    ],
)
def test_a_bad_blip_model_folder_is_refused_naming_it(folder, tiny_blip, tmp_path, offline, model, expected, capsys):
    path = tmp_path / model
    if model == "empty":
        path.mkdir()
    elif model == "not-blip":
        path.mkdir()
        (path / "config.json").write_text('{"model_type": "clip"}', encoding="utf-8")
    elif model == "no-weights":
        shutil.copytree(tiny_blip, path, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    elif model == "file":
        path.write_text("hello\n", encoding="utf-8")
    target = model if model.startswith("./") else str(path)
    assert cli.main(["label", str(folder), "--backend", "blip", "--model", target]) == 2
    err = capsys.readouterr().err
    assert expected in err and f"--model {target}" in err and "Traceback" not in err and offline == []


def _truncate(path: Path) -> None:
    Image.effect_noise((64, 64), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_the_template_backend_never_opens_images(folder, monkeypatch, capsys):
    _truncate(folder / "img1.png")
    opened = []
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(args) or pytest.fail("opened"))
    assert cli.main(["label", str(folder), "--trigger", "zz"]) == 0
    assert opened == [] and "wrote 3 caption(s)" in capsys.readouterr().out
    rows = (folder / "metadata.csv").read_text(encoding="utf-8").splitlines()
    assert rows == ["file_name,text", "img0.png,a photo of zz", "img1.png,a photo of zz", "img2.png,a photo of zz"]


def test_a_model_backend_refuses_or_skips_an_image_that_does_not_decode(folder, tiny_clip, tmp_path, capsys):
    _truncate(folder / "img1.png")
    (tmp_path / "tags.txt").write_text("red\ngreen\n", encoding="utf-8")
    command = ["label", str(folder), "--backend", "openclip", "--model", tiny_clip["name"]]
    command += ["--pretrained", tiny_clip["checkpoint"], "--tags", str(tmp_path / "tags.txt")]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert str(folder / "img1.png") in err and "--bad-images skip" in err and "Traceback" not in err
    assert not (folder / "metadata.csv").exists()
    assert cli.main([*command, "--bad-images", "skip"]) == 0
    out, err = capsys.readouterr()
    assert "wrote 2 caption(s)" in out and "skipped 1 image(s)" in err
    rows = (folder / "metadata.csv").read_text(encoding="utf-8").splitlines()
    assert [row.split(",")[0] for row in rows] == ["file_name", "img0.png", "img2.png"]


def test_a_missing_folder_or_a_file_is_named_as_such(tmp_path, capsys):
    assert cli.main(["label", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    (tmp_path / "photo.png").write_bytes(b"")
    assert cli.main(["label", str(tmp_path / "photo.png"), "--backend", "openclip", "--model", "ViT-B-32"]) == 2
    assert f"{tmp_path / 'photo.png'}: a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--backend", "openclip", "--model", "ViT-B-32", "--tags", "{tmp}/none.txt"], "--tags {tmp}/none.txt"),
        (["--backend", "openclip", "--model", "ViT-B-32", "--tags", "{tmp}"], "--tags {tmp}: cannot be read"),
        (["--backend", "openclip", "--model", "tiny", "--model-config", "{tmp}/tiny.json"], "--model-config"),
        (["--backend", "openclip", "--model", "ViT-B-3", "--pretrained", "openai"], "did you mean ViT-B-32"),
        (["--backend", "openclip", "--model", "ViT-B-32", "--pretrained", "x", "--top-k", "0"], "--top-k 0"),
        (["--backend", "openclip", "--model", "ViT-B-32", "--pretrained", "x", "--device", "cuda:99"], "cuda:99"),
        (["--backend", "openclip", "--model", "ViT-B-32", "--pretrained", "x", "--device", "gpu"], "not a torch"),
        (["--backend", "blip", "--model", "x", "--pretrained", "openai"], "--pretrained: not used by --backend"),
        (["--template", "a {name}"], "only {trigger} can be filled in"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--caption-column", "file_name"], "--caption-column 'file_name'"),
    ],
)
def test_bad_options_are_refused_naming_them(folder, tmp_path, offline, options, expected, capsys):
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    assert cli.main(["label", str(folder), *options]) == 2
    err = capsys.readouterr().err
    assert expected.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err and offline == []
    assert not (folder / "metadata.csv").exists()
