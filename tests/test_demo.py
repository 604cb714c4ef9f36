"""unimm demo: the procedural data set and its judge, the patch tokenizers, the report files."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from unimm.demo import data, report
from unimm.demo.tokenizer import (
    PatchFeatureTokenizer,
    PatchVQTokenizer,
    as_float_images,
    nearest_codes,
    patchify,
    psnr,
    to_uint8,
    unpatchify,
)
from unimm.kernels import vq_quantize
from unimm.testing import seeded


@pytest.fixture(scope="module")
def shapes():
    return data.make_shapes(400, seed=3)


@pytest.fixture(scope="module")
def held_out():
    return data.make_shapes(300, seed=3, split="test")


def labels(shape_set):
    return [shape_set.labels(i) for i in range(len(shape_set))]


def blur_and_noise(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """A [1 2 1]/4 blur in both directions plus Gaussian noise: a mildly degraded generation."""
    x = images.astype(np.float64)
    for axis in (1, 2):
        padded = np.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(4)], mode="edge")
        x = (np.take(padded, range(0, x.shape[axis]), axis=axis) + 2 * np.take(padded, range(1, x.shape[axis] + 1),
             axis=axis) + np.take(padded, range(2, x.shape[axis] + 2), axis=axis)) / 4
    x += np.random.default_rng(seed).normal(0, sigma, x.shape)
    return np.clip(x, 0, 255)


# ---- data --------------------------------------------------------------------------------------

def test_shapes_are_deterministic_and_splits_differ(shapes, held_out):
    again = data.make_shapes(400, seed=3)
    assert np.array_equal(again.images, shapes.images) and again.captions == shapes.captions
    assert shapes.images.shape == (400, 32, 32, 3) and shapes.images.dtype == np.uint8
    assert not np.array_equal(held_out.images[:10], shapes.images[:10])
    assert not np.array_equal(data.make_shapes(10, seed=4).images, shapes.images[:10])
    # every colour / shape / position appears, and every combination in a larger draw
    combos = {(c, s, p) for c, s, p in zip(*(data.make_shapes(3000, seed=0).__dict__[k]
                                              for k in ("colour", "shape", "position")))}
    assert len(combos) == len(data.COLOURS) * len(data.SHAPES) * len(data.POSITIONS)


def test_captions_name_the_attributes(shapes):
    for i in range(20):
        colour, shape, position = shapes.labels(i)
        caption = shapes.captions[i]
        assert caption == data.caption(colour, shape, position)
        assert data.parse_caption(caption) == (colour, shape, position)
    assert data.caption("blue", "square", "center") == "a blue square in the center"
    assert data.parse_caption("a red red circle at the top") == (None, "circle", None)
    assert data.parse_caption("a green square in the center at the top left")[2] is None


def test_config_checks():
    with pytest.raises(ValueError, match="image_size"):
        data.ShapesConfig(image_size=30)
    with pytest.raises(ValueError, match="colours"):
        data.ShapesConfig(colours=("red", "purple"))
    with pytest.raises(ValueError, match="size_range"):
        data.ShapesConfig(size_range=(0.3, 0.6))
    with pytest.raises(ValueError, match="split"):
        data.make_shapes(2, split="validation")
    with pytest.raises(ValueError, match="n must"):
        data.make_shapes(0)
    small = data.make_shapes(50, 0, config=data.ShapesConfig(image_size=48, colours=("red", "blue"),
                                                              shapes=("square",), positions=("center",)))
    assert small.images.shape == (50, 48, 48, 3)
    assert {small.labels(i) for i in range(50)} == {("red", "square", "center"), ("blue", "square", "center")}


def test_judge_reads_clean_images_exactly(shapes, held_out):
    for shape_set in (shapes, held_out):
        assert [tuple(data.judge(image)) for image in shape_set.images] == labels(shape_set)


def test_judge_is_robust_to_blur_and_noise(held_out):
    degraded = blur_and_noise(held_out.images, sigma=20, seed=0)
    accuracy = data.attribute_accuracy([tuple(data.judge(image)) for image in degraded], labels(held_out))
    assert accuracy["all"] >= 0.95, accuracy


def test_judge_without_a_shape_and_bad_input():
    assert data.judge(np.full((32, 32, 3), 200, np.uint8)) == data.Judgement(None, None, None)
    speck = np.full((32, 32, 3), 20, np.uint8)
    speck[5, 5] = 255  # one bright pixel is noise, not a shape
    assert data.judge(speck) == data.Judgement(None, None, None)
    with pytest.raises(ValueError, match="image must be"):
        data.judge(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="colours"):
        data.judge(np.zeros((32, 32, 3)), colours=("purple",))


def test_attribute_accuracy():
    got = data.attribute_accuracy([("red", "circle", "center"), ("red", "square", "top left")],
                                  [("red", "circle", "center"), ("blue", "square", "top left")])
    assert got == dict(colour=0.5, shape=1.0, position=1.0, all=0.5)
    with pytest.raises(ValueError):
        data.attribute_accuracy([], [])


def test_word_tokenizer_round_trip():
    tok = data.WordTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = f"{data.DRAW_PROMPT} a cyan triangle at the bottom right"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("a red", eos=True) + tok.encode("square")) == "a red"  # stops at EOS
    assert tok.decode([tok.pad_id, 10_000] + tok.encode("center")) == "center"  # skips pad and non-text ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("a purple circle")
    for caption in data.make_shapes(50, 1).captions:
        tok.encode(f"{data.CAPTION_PROMPT} {caption}")


# ---- tokenizers ----------------------------------------------------------------------------------

def test_patchify_round_trip(shapes):
    images = as_float_images(shapes.images[:5])
    patches = patchify(images, 4)
    assert patches.shape == (5, 64, 48)
    assert torch.equal(patches[0, 1], images[0, 0:4, 4:8].reshape(-1))  # row-major grid, (row, col, channel)
    assert torch.equal(unpatchify(patches, 32, 4), images)
    assert np.array_equal(to_uint8(images), shapes.images[:5])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify(images, 5)


def test_nearest_codes_matches_vq_kernel(backend):
    z = torch.randn(300, 48, generator=seeded(0))
    codebook = torch.randn(70, 48, generator=seeded(1))
    assert torch.equal(nearest_codes(z, codebook), vq_quantize(z, codebook))


@pytest.fixture(scope="module")
def vq_tokenizer(shapes):
    tokenizer = PatchVQTokenizer(256)
    errors = tokenizer.fit(shapes.images, iterations=10, max_patches=12288, generator=seeded(0))
    return tokenizer, errors


def test_vq_tokenizer_reconstructs_what_the_judge_reads(vq_tokenizer, held_out):
    tokenizer, errors = vq_tokenizer
    assert errors[-1] <= errors[0] and len(errors) >= 2
    codes = tokenizer.encode(held_out.images)
    assert codes.shape == (300, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 256
    assert codes.unique().numel() > 128  # k-means++ spreads the codes
    decoded = tokenizer.decode(codes)
    assert decoded.shape == (300, 32, 32, 3) and 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    assert psnr(decoded, held_out.images) > 24
    accuracy = data.attribute_accuracy([tuple(data.judge(image)) for image in to_uint8(decoded)], labels(held_out))
    assert accuracy["all"] >= 0.95, accuracy
    assert torch.equal(tokenizer.decode(codes.reshape(300, 64)), decoded)
    # decoding is the quantizer's lookup: the code vectors themselves
    assert torch.equal(patchify(decoded, 4)[0, 0], tokenizer.quantizer.codebook[codes[0, 0, 0]].detach().clamp(0, 1))


def test_vq_tokenizer_checks():
    tokenizer = PatchVQTokenizer(16)
    with pytest.raises(RuntimeError, match="fit"):
        tokenizer.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="at least num_codes"):
        PatchVQTokenizer(1000).fit(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="patch_size"):
        PatchVQTokenizer(16, patch_size=5)
    # fewer distinct patches than codes: fitting still ends with a usable codebook
    flat = np.zeros((4, 32, 32, 3), np.uint8)
    flat[2:] = 200
    tokenizer.fit(flat, generator=seeded(0))
    assert np.array_equal(to_uint8(tokenizer.decode(tokenizer.encode(flat))), flat)
    with pytest.raises(ValueError, match="codes must be"):
        tokenizer.decode(torch.zeros(1, 7, dtype=torch.long))


def test_feature_tokenizer_is_exact_without_pca(shapes, held_out):
    tokenizer = PatchFeatureTokenizer()
    assert tokenizer.fit(shapes.images) == 1.0
    features = tokenizer.encode(held_out.images)
    assert features.shape == (300, 64, 48) and tokenizer.token_dim == 48
    assert abs(float(features.mean())) < 0.1 and abs(float(features.std()) - 1) < 0.1
    assert (tokenizer.decode(features) - as_float_images(held_out.images)).abs().max() < 1e-5


def test_feature_tokenizer_with_pca(shapes, held_out):
    tokenizer = PatchFeatureTokenizer(dims=16)
    kept = tokenizer.fit(shapes.images)
    assert 0.95 < kept < 1
    features = tokenizer.encode(held_out.images)
    assert features.shape == (300, 64, 16)
    assert torch.allclose(features.reshape(-1, 16).std(0), torch.ones(16), atol=0.15)  # whitened
    decoded = tokenizer.decode(features)
    assert psnr(decoded, held_out.images) > 25
    accuracy = data.attribute_accuracy([tuple(data.judge(image)) for image in to_uint8(decoded)], labels(held_out))
    assert accuracy["all"] >= 0.95, accuracy
    with pytest.raises(ValueError, match="features must be"):
        tokenizer.decode(features[..., :8])
    with pytest.raises(ValueError, match="dims"):
        PatchFeatureTokenizer(dims=49)
    with pytest.raises(RuntimeError, match="fit"):
        PatchFeatureTokenizer().decode(features)


# ---- report --------------------------------------------------------------------------------------

def test_image_grid(tmp_path, shapes):
    path = report.image_grid(shapes.images[:10], [f"{c}\nmore words to wrap around" * 2 for c in shapes.captions[:10]],
                             tmp_path / "sub" / "grid.png", columns=4, scale=2, label_lines=2)
    with Image.open(path) as image:
        width, height = image.size
        assert width == 4 * (64 + 12) and height == 3 * (64 + 12 + 2 * 14)
        # the first image, upscaled by nearest neighbour, sits at the top-left cell
        cell = np.asarray(image.convert("RGB"))[6:6 + 64, 6:6 + 64]
        assert np.array_equal(cell[::2, ::2], shapes.images[0])
    with pytest.raises(ValueError, match="labels"):
        report.image_grid(shapes.images[:2], ["one"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        report.image_grid(shapes.images[:2].astype(np.float32), ["a", "b"], tmp_path / "x.png")


def test_loss_curves(tmp_path):
    steps = list(range(100))
    path = report.loss_curves({"text": (steps, [3 * math.exp(-s / 30) + 0.01 for s in steps]),
                               "image": (steps, [5.0 - s / 50 for s in steps[:-1]] + [math.nan])},
                              tmp_path / "loss.png")
    with Image.open(path) as image:
        assert image.size == (900, 520)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    for colour in report.LINE_COLOURS[:2]:  # both lines drawn
        rgb = tuple(int(colour[k:k + 2], 16) for k in (1, 3, 5))
        assert (pixels == rgb).all(-1).sum() > 100
    report.loss_curves({"one point": ([0], [1.0])}, tmp_path / "one.png", log_scale=False)
    with pytest.raises(ValueError, match="log_scale"):
        report.loss_curves({"x": ([0, 1], [1.0, -1.0])}, tmp_path / "bad.png", log_scale=True)
    with pytest.raises(ValueError, match="differ in length"):
        report.loss_curves({"x": ([0, 1], [1.0])}, tmp_path / "bad.png")


def test_smoothing_has_no_lag():
    assert report.smooth([0.0, 1, 2, 3, 4], 3) == [0.5, 1.0, 2.0, 3.0, 3.5]
    assert report.smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_metrics_and_summary(tmp_path):
    path = report.write_metrics(tmp_path / "metrics.json", dict(accuracy=np.float32(0.75), nan=math.nan,
                                                                codes=torch.arange(3), nested={"p": tmp_path}))
    assert json.loads(path.read_text()) == dict(accuracy=0.75, nan=None, codes=[0, 1, 2], nested={"p": str(tmp_path)})
    table = report.summary_table([dict(task="captions", all=0.93251), dict(task="images", colour=1.0, all=None)])
    lines = table.splitlines()
    assert lines[0] == "| task     | all    | colour |"
    assert lines[2] == "| captions | 0.9325 | -      |"
    assert lines[3] == "| images   | -      | 1      |"
    assert all(len(line) == len(lines[0]) for line in lines)


# ---- the whole pipeline ----------------------------------------------------------------------------

def test_demo_smoke_run(tmp_path, monkeypatch, capsys):
    """``unimm demo --config smoke``: every stage runs, the outputs exist, the loss falls."""
    from unimm.cli import main

    monkeypatch.setenv("UNIMM_BACKEND", "reference")  # CPU: the plain PyTorch path, not Triton's interpreter
    assert main(["demo", "--config", "smoke", "--steps", "24", "--out", str(tmp_path), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| captions " in printed and "images_from_codes" in printed and "loss " in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("samples.png", "loss.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    assert metrics["config"]["steps"] == 24 and metrics["seed"] == 1 and metrics["device"] == "cpu"
    history = metrics["loss"]["history"]
    assert len(history["loss"]) == 24 and all(math.isfinite(v) for v in history["loss"])
    first, last = np.mean(history["loss"][:4]), np.mean(history["loss"][-4:])
    assert last < 0.8 * first, (first, last)  # it learns
    assert np.mean(history["image_code_loss"][-4:]) < np.mean(history["image_code_loss"][:4])
    assert np.mean(history["text_loss"][-4:]) < np.mean(history["text_loss"][:4])
    for task in ("captions", "images_from_codes", "images_from_continuous"):
        assert set(metrics["accuracy"][task]) == {"colour", "shape", "position", "all"}
    assert metrics["tokenizers"]["vq"]["psnr_db"] > 15 and metrics["tokenizers"]["continuous"]["psnr_db"] > 15
    assert len(metrics["examples"]) == 4 and metrics["seconds"]["train"] > 0


def test_demo_command_line_checks(capsys):
    from unimm.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--config", "huge"])
