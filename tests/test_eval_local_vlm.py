"""The local transformers judge on a tiny random LLaVA built from config (no download)."""

import pytest
from PIL import Image

from loraloom.evaluation.cache import JudgeCache
from loraloom.evaluation.errors import EvaluationError
from loraloom.evaluation.fakes import tiny_llava_folder
from loraloom.evaluation.judges.local_vlm import TransformersVLMJudge
from loraloom.evaluation.protocols import ComposLoRAPairwise, Element, LoRARarYesNo


@pytest.fixture(scope="module")
def yes_vlm(tmp_path_factory):
    folder = tiny_llava_folder(tmp_path_factory.mktemp("llava-yes"), always_first_token=True)
    return TransformersVLMJudge(folder, device="cpu", max_new_tokens=1)


def test_vlm_answers_through_generate_and_votes(yes_vlm, tmp_path):
    refs = [Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (30, 40), (0, 200, 0))]
    cache = JudgeCache(tmp_path / "cache.jsonl")
    vote = LoRARarYesNo(yes_vlm, cache).subject(Image.new("RGB", (64, 64), (0, 0, 200)), refs)
    assert [v.text for v in vote.votes] == ["yes", "yes"]  # only the new tokens are decoded
    assert vote.approved is True and yes_vlm.requests_sent == 2
    again = LoRARarYesNo(yes_vlm, JudgeCache(tmp_path / "cache.jsonl")).subject(Image.new("RGB", (64, 64), (0, 0, 200)), refs)
    assert again.approved is True and yes_vlm.requests_sent == 2  # cached


def test_random_vlm_gibberish_is_a_failure_not_a_score(tmp_path):
    judge = TransformersVLMJudge(tiny_llava_folder(tmp_path / "llava"), device="cpu", max_new_tokens=6)
    result = ComposLoRAPairwise(judge, reask=0).compare(Image.new("RGB", (32, 32), (9, 9, 9)),
                                                        Image.new("RGB", (32, 32), (99, 99, 99)),
                                                        [Element("cat", "object", ("cat",))])
    assert judge.requests_sent == 2 and not result.ok and result.scores_a is None
    assert all(o.text is not None and o.error.startswith("unparseable") for o in result.orders)
    assert judge.decoding()["do_sample"] is False


def test_missing_vlm_names_the_fix(tmp_path):
    with pytest.raises(EvaluationError, match="Fix"):
        TransformersVLMJudge(tmp_path / "nope", device="cpu")
