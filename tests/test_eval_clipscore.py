"""CLIPScore: torchmetrics equality, conventions (scale, clamp), long texts, batching, both backends."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from loraloom.evaluation.clipscore import HESSEL_SCALE, CLIPScorer, OpenCLIPEmbedder, TransformersCLIPEmbedder, load_clip_embedder
from loraloom.evaluation.errors import EvaluationError
from loraloom.evaluation.fakes import register_tiny_open_clip, tiny_clip_folder

TEXTS = ["a red cat", "dog", "blue castle", "a photo of a girl", "watercolor style dog", "cat"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return CLIPScorer.from_transformers(clip_dir, device="cpu")


def noise_images(n, seed=0, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_equals_torchmetrics_clipscore(clip_dir, scorer):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class TensorCLIP(CLIPModel):  # torchmetrics 1.9 expects tensors from get_*_features (transformers 5 gives outputs)
        def get_image_features(self, *a, **k):
            o = super().get_image_features(*a, **k)
            return o if torch.is_tensor(o) else o.pooler_output

        def get_text_features(self, *a, **k):
            o = super().get_text_features(*a, **k)
            return o if torch.is_tensor(o) else o.pooler_output

    model = TensorCLIP.from_pretrained(clip_dir, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    images = noise_images(len(TEXTS))
    ours = scorer.score(images, TEXTS)
    theirs = []
    for image, text in zip(images, TEXTS):
        metric = CLIPScore(model_name_or_path=lambda: (model, processor))
        theirs.append(float(metric(torch.from_numpy(np.array(image)).permute(2, 0, 1), text).detach()))
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert any(s > 0 for s in ours) and any(s == 0 for s in ours)  # both sides of the clamp are exercised


def test_scale_and_clamp(clip_dir, scorer):
    images = noise_images(len(TEXTS))
    details = scorer.score_details(images, TEXTS)
    hessel = CLIPScorer(scorer.embedder, scale=HESSEL_SCALE).score(images, TEXTS)
    for d, h in zip(details, hessel):
        assert d.score == pytest.approx(100 * max(d.cosine, 0.0))
        assert h == pytest.approx(2.5 * max(d.cosine, 0.0))
    assert any(d.cosine < 0 and d.score == 0 for d in details)
    assert scorer.describe()["scale"] == 100.0 and scorer.describe()["backend"] == "transformers"


def test_batching_does_not_change_scores(scorer):
    images = noise_images(5, seed=1)
    texts = TEXTS[:5]
    one = CLIPScorer(scorer.embedder, batch_size=1).score(images, texts)
    assert CLIPScorer(scorer.embedder, batch_size=4).score(images, texts) == pytest.approx(one, abs=1e-4)
    # images given as files score the same as in memory
    assert scorer.embedder.image_embeddings(images[:1]).shape[-1] == 16


def test_long_text_warns_flags_and_cuts_like_clip(scorer, caplog):
    long_text = " ".join(["red cat"] * 60)  # 120 words > 77 tokens
    image = noise_images(1)[0]
    with caplog.at_level(logging.WARNING, logger="loraloom.evaluation.clipscore"):
        (d,) = scorer.score_details([image], [long_text])
    assert d.truncated and d.text_tokens == 122
    assert "longer than" in caplog.text and "truncated" in caplog.text
    # the cut keeps the end-of-text token last: the same as scoring the first 75 words' tokens by hand
    cut = " ".join(long_text.split()[:75])
    (ref,) = scorer.score_details([image], [cut])
    assert not ref.truncated and d.cosine == pytest.approx(ref.cosine, abs=1e-6)
    with pytest.raises(EvaluationError, match="longer than"):
        CLIPScorer(scorer.embedder, long_text="error").score([image], [long_text])


def test_mismatched_inputs_and_bad_settings(scorer):
    with pytest.raises(EvaluationError, match="one text per image"):
        scorer.score(noise_images(2), ["cat"])
    with pytest.raises(EvaluationError):
        CLIPScorer(scorer.embedder, long_text="silently")
    with pytest.raises(EvaluationError):
        CLIPScorer(scorer.embedder, scale=0)


def test_transformers_backend_errors_name_the_fix(tmp_path):
    with pytest.raises(EvaluationError, match="Fix"):
        TransformersCLIPEmbedder(tmp_path / "nothing-here", device="cpu")
    with pytest.raises(EvaluationError, match="local Hugging Face cache"):
        TransformersCLIPEmbedder("loraloom-test/not-a-real-model", device="cpu")
    with pytest.raises(EvaluationError, match="names no weights"):
        load_clip_embedder("open_clip:ViT-B-16")


def test_open_clip_backend_with_local_checkpoint(tmp_path):
    import open_clip

    name = register_tiny_open_clip(tmp_path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    embedder = load_clip_embedder(f"open_clip:{name}@{ckpt}", device="cpu")
    assert CLIPScorer.from_open_clip(name, str(ckpt), device="cpu").describe()["model"] == f"{name}@{ckpt}"
    assert isinstance(embedder, OpenCLIPEmbedder) and embedder.context_length == 77
    images, texts = noise_images(3, seed=2), ["a red cat", "dog", "castle"]
    got = CLIPScorer(embedder, batch_size=2).score_details(images, texts)
    model.eval()
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer(name)(texts)), dim=-1)
    cos = (img * txt).sum(-1).tolist()
    assert [d.cosine for d in got] == pytest.approx(cos, abs=1e-5)
    assert [d.text_tokens for d in got] == [5, 3, 3]
    (d,) = CLIPScorer(embedder).score_details(images[:1], [" ".join(["red"] * 80)])
    assert d.truncated and d.text_tokens == 82
