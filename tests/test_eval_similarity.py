"""Image–image fidelity: pinned DINO preprocessing, DINO and CLIP-I cosines to references."""

import numpy as np
import pytest
import torch
from PIL import Image

from loraloom.evaluation.clipscore import CLIPScorer
from loraloom.evaluation.errors import EvaluationError
from loraloom.evaluation.fakes import tiny_clip_folder, tiny_dinov2
from loraloom.evaluation.similarity import IMAGENET_MEAN, ClipImageEncoder, DinoEncoder, DinoPreprocess, ImageSimilarity


def noise(seed, size=(40, 30)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_dino_preprocess_is_pinned():
    pre = DinoPreprocess()
    x = pre(Image.new("RGB", (640, 480), (124, 116, 104)))  # ≈ ImageNet mean colour
    assert x.shape == (3, 224, 224)
    assert x.abs().max() < 0.01  # normalised with ImageNet mean/std
    # short side to 256, then centre crop: a left/right split image keeps its split in the middle
    im = Image.new("RGB", (512, 256), (0, 0, 0))
    im.paste((255, 255, 255), (256, 0, 512, 256))
    x = DinoPreprocess(resize=64, crop=32)(im)
    assert x.shape == (3, 32, 32) and x[0, 0, 0] < 0 < x[0, 0, -1]
    assert pre.mean == IMAGENET_MEAN and pre.resize == 256 and pre.crop == 224


@pytest.fixture(scope="module")
def dino():
    return DinoEncoder.from_model(tiny_dinov2(), name="tiny-dinov2", device="cpu", preprocess=DinoPreprocess(36, 32))


def test_dino_fidelity(dino):
    sim = ImageSimilarity(dino)
    a, b, c = noise(0), noise(1), noise(2)
    m = sim.matrix([a, b], [a, c])
    assert m.shape == (2, 2) and m[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert sim.fidelity([a, b], [a, c]) == pytest.approx(m.mean(dim=1).tolist())
    assert sim.describe()["preprocess"]["resize"] == 36 and sim.describe()["encoder"] == "dino"
    # the embedding is the CLS token of the last (normed) layer
    with torch.no_grad():
        cls = dino.model(pixel_values=dino.preprocess(b)[None]).last_hidden_state[0, 0]
    assert torch.nn.functional.normalize(cls, dim=0) @ dino.image_embeddings([b])[0] == pytest.approx(1.0, abs=1e-5)


def test_dino_from_folder_and_vit_dino(tmp_path):
    from transformers import ViTConfig, ViTModel

    tiny_dinov2().save_pretrained(tmp_path / "dinov2")
    enc = DinoEncoder(tmp_path / "dinov2", device="cpu", preprocess=DinoPreprocess(36, 32))
    assert enc.image_embeddings([noise(0)]).shape == (1, 32)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                             image_size=32, patch_size=8))
    enc = DinoEncoder.from_model(vit, device="cpu", preprocess=DinoPreprocess(52, 48))  # 48 px: interpolated positions
    assert enc.image_embeddings([noise(0), noise(1)]).shape == (2, 32)
    with pytest.raises(EvaluationError, match="not a DINO encoder"):
        DinoEncoder.from_model(torch.nn.Linear(2, 2))
    with pytest.raises(EvaluationError, match="Fix"):
        DinoEncoder(tmp_path / "missing")


def test_clip_i(tmp_path):
    scorer = CLIPScorer.load(str(tiny_clip_folder(tmp_path)), device="cpu")
    sim = ImageSimilarity(ClipImageEncoder(scorer))
    a, b = noise(3), noise(4)
    m = sim.matrix([a, b], [a])
    assert m[0, 0] == pytest.approx(1.0, abs=1e-5) and m[1, 0] < 0.9999
    assert sim.describe()["encoder"] == "clip-i"
