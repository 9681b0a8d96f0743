"""ComposLoRA's pairwise protocol (both orders, averaged, win/tie/lose) and LoRA.rar's yes/no votes."""

import json

import pytest
from PIL import Image

from loraloom.evaluation.cache import JudgeCache
from loraloom.evaluation.judges import JudgeRequest
from loraloom.evaluation.parsing import parse_yes_no
from loraloom.evaluation.protocols import (
    ComposLoRAPairwise,
    Element,
    LoRARarYesNo,
    PairwiseResult,
    element_lines,
    mars2,
    style_name,
    win_tie_lose,
)


class ScriptedJudge:
    """An in-process judge: answers from a function of (prompt, images); counts requests."""

    backend, model = "scripted", "scripted-1"

    def __init__(self, answer):
        self.answer, self.requests_sent, self.seen = answer, 0, []

    def decoding(self):
        return {}

    def complete(self, request: JudgeRequest) -> str:
        self.requests_sent += 1
        self.seen.append(request)
        return self.answer(request.prompt, [b.image() for b in request.images])


def gray(v):
    return Image.new("RGB", (8, 8), (v, v, v))


def pair_answer(c1, q1, c2, q2):
    return json.dumps({"image_1": {"composition_quality": c1, "image_quality": q1},
                       "image_2": {"composition_quality": c2, "image_quality": q2}})


ELEMENTS = [Element("Nezuko", "character", ("nezuko", "pink kimono")), Element("Castle", "background", ())]


def test_element_lines_follow_composlora():
    assert element_lines(ELEMENTS) == "1. character (Nezuko): nezuko, pink kimono\n2. background (Castle): Castle"


def test_both_orders_averaged_and_mapped_back():
    # position bias: the first image shown always gets +2 composition; the brighter image +1 image quality
    def biased(prompt, imgs):
        bright = [im.getpixel((0, 0))[0] for im in imgs]
        return pair_answer(8, 5 + (bright[0] > bright[1]), 6, 5 + (bright[1] > bright[0]))

    judge = ScriptedJudge(biased)
    result = ComposLoRAPairwise(judge).compare(gray(200), gray(50), ELEMENTS)
    assert result.ok and judge.requests_sent == 2
    assert [r.images[0].image().getpixel((0, 0))[0] for r in judge.seen] == [200, 50]  # A first, then B first
    assert result.scores_a == {"composition": 7.0, "image_quality": 6.0}
    assert result.scores_b == {"composition": 7.0, "image_quality": 5.0}
    assert result.outcome == {"composition": "tie", "image_quality": "win"}  # the position bias cancels out
    one = ComposLoRAPairwise(ScriptedJudge(biased), both_orders=False).compare(gray(200), gray(50), ELEMENTS)
    assert len(one.orders) == 1 and one.outcome["composition"] == "win"  # … and does not with one order


def test_one_failed_order_fails_the_comparison_with_reasons():
    answers = iter([pair_answer(8, 8, 6, 6), "I prefer the first.", "Still the first."])
    result = ComposLoRAPairwise(ScriptedJudge(lambda p, i: next(answers)), reask=1).compare(gray(1), gray(2), ELEMENTS)
    assert not result.ok and result.scores_a is None and result.outcome is None
    assert "order b-first" in result.error and result.orders[1].text == "Still the first." and result.orders[1].samples == 2


def test_reask_recovers_and_is_cached_per_sample(tmp_path):
    answers = iter(["no scores here", pair_answer(8, 8, 6, 6), pair_answer(6, 6, 8, 8)])
    judge = ScriptedJudge(lambda p, i: next(answers))
    cache = tmp_path / "c.jsonl"
    first = ComposLoRAPairwise(judge, JudgeCache(cache), reask=2).compare(gray(1), gray(2), ELEMENTS)
    assert first.ok and judge.requests_sent == 3 and first.orders[0].samples == 2
    replay = ScriptedJudge(lambda p, i: pytest.fail("asked again"))
    again = ComposLoRAPairwise(replay, JudgeCache(cache), reask=2).compare(gray(1), gray(2), ELEMENTS)
    assert replay.requests_sent == 0 and again.scores_a == first.scores_a


def test_win_tie_lose_counts_and_rates():
    def r(outcome):
        return PairwiseResult(orders=[], scores_a={}, scores_b={}, outcome={"composition": outcome, "image_quality": "tie"})

    results = [r("win"), r("win"), r("lose"), r("tie"), PairwiseResult(orders=[], error="x")]
    table = win_tie_lose(results)
    c = table["composition"]
    assert (c.win, c.tie, c.lose, c.failed, c.n) == (2, 1, 1, 1, 4)
    assert c.rates() == {"win": 0.5, "tie": 0.25, "lose": 0.25}
    assert table["image_quality"].tie == 4


def test_lorarar_majority_votes_and_failures():
    refs = [gray(10), gray(20), gray(30)]
    answers = {10: '{"answer": "yes"}', 20: "Yes.", 30: "No"}
    judge = ScriptedJudge(lambda prompt, imgs: answers[imgs[0].getpixel((0, 0))[0]])
    protocol = LoRARarYesNo(judge)
    subject = protocol.subject(gray(99), refs)
    assert (subject.yes, subject.no, subject.failed, subject.approved) == (2, 1, 0, True)
    assert all(r.images[1].image().getpixel((0, 0))[0] == 99 for r in judge.seen)  # reference first, test image second
    answers = {10: "No", 20: "Hard to say", 30: "Hmm"}
    style = protocol.style(gray(99), refs, style="watercolor")
    assert (style.yes, style.no, style.failed, style.approved) == (0, 1, 2, False)
    assert '"watercolor"' in judge.seen[-1].prompt
    assert mars2(subject, style) is False
    answers = {10: "?", 20: "?", 30: "?"}
    nothing = protocol.subject(gray(99), refs)
    assert nothing.approved is None and mars2(subject, nothing) is None
    assert parse_yes_no("?").error  # those were failures, not votes


def test_style_name_strips_digits():
    assert style_name("watercolor2") == "watercolor" and style_name("oil_painting_3") == "oil painting"
