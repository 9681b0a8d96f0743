"""Judging protocols: ComposLoRA's pairwise comparison and LoRA.rar's yes/no votes.

**ComposLoRA** (Zhong et al. 2024, docs/methods/composlora.md#evaluation; MLC `evaluate.py`, `human_eval/gpt4v.py`): the judge sees two images
made for the same composition set and scores each for composition quality and image quality (0–10). Judges
favour one position, so each pair is asked in both orders and each image's scores are averaged over the two;
per dimension, A *wins* when its averaged score is higher than B's, *ties* when equal, *loses* when lower.
With `both_orders=False` only (A, B) is asked (cheaper, position-biased; the result says so).

**LoRA.rar** (Shenaj et al. 2025, `mllm_eval.py`): for every reference image of the subject (or the style), ask
whether the test image shows the same subject (is in that style): yes or no. The image is approved when more
than half of the valid answers are yes. MARS² counts an image only if both subject and style are approved.

Unparseable answers are asked again (`reask` times, each re-ask cached as its own sample) and then recorded as
failures with their raw text; a failed comparison has no scores, never a guessed one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from loraloom.evaluation.cache import JudgeCache
from loraloom.evaluation.images import ImageBlob, ImageLike
from loraloom.evaluation.judges.base import Answer, Judge, JudgeRequest, ask
from loraloom.evaluation.parsing import PAIRWISE_DIMENSIONS, Parsed, parse_pairwise, parse_yes_no
from loraloom.evaluation.prompts import load_template

OUTCOMES = ("win", "tie", "lose")


@dataclass(frozen=True)
class Element:
    """One LoRA of a composition set, as the judge is told about it."""

    name: str
    category: str | None = None
    triggers: tuple[str, ...] = ()


def element_lines(elements: Sequence[Element]) -> str:
    """ComposLoRA's element list: `<i>. <category> (<LoRA name>): <trigger words, comma-joined>`, one per line."""
    return "\n".join(f"{i}. {e.category or 'element'} ({e.name}): {', '.join(e.triggers) or e.name}"
                     for i, e in enumerate(elements, 1))


@dataclass
class Asked:
    """The answers read for one question (first ask and re-asks) and what they parsed to."""

    parsed: Parsed | None = None
    text: str | None = None  # the last raw answer
    error: str | None = None  # request failure or parse failure of the last answer
    samples: int = 0
    cached: int = 0


def ask_until_parsed(judge: Judge, request: JudgeRequest, parse, cache: JudgeCache | None, reask: int) -> Asked:
    """Ask (sample 0), and while the answer does not parse, ask again up to `reask` times."""
    out = Asked()
    for sample in range(reask + 1):
        answer: Answer = ask(judge, request, cache, sample=sample)
        out.samples += 1
        out.cached += answer.cached
        if not answer.ok:  # the judge already retried the transport; re-asking would repeat that
            out.error, out.text = f"request failed: {answer.error}", None
            return out
        out.text, out.parsed = answer.text, parse(answer.text)
        if out.parsed.ok:
            out.error = None
            return out
        out.error = f"unparseable answer: {out.parsed.error}"
    return out


@dataclass
class OrderResult:
    """One order of a pairwise question: which image was shown first, and the scores mapped back to A and B."""

    first: str  # "a" or "b"
    scores: dict[str, dict[str, float]] | None  # {"a": {dimension: score}, "b": {...}}
    text: str | None
    error: str | None
    parse_method: str | None
    samples: int
    cached: int

    @property
    def ok(self) -> bool:
        return self.scores is not None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PairwiseResult:
    """Scores of A and B averaged over the orders asked, and A's outcome against B per dimension."""

    orders: list[OrderResult]
    scores_a: dict[str, float] | None = None
    scores_b: dict[str, float] | None = None
    outcome: dict[str, str] | None = None  # dimension -> "win" | "tie" | "lose" (A against B)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"scores_a": self.scores_a, "scores_b": self.scores_b, "outcome": self.outcome, "error": self.error,
                "orders": [o.to_dict() for o in self.orders]}


def outcome_of(a: float, b: float) -> str:
    return "win" if a > b else "lose" if a < b else "tie"


class ComposLoRAPairwise:
    """ComposLoRA's pairwise protocol. `compare(image_a, image_b, elements)` → `PairwiseResult`."""

    dimensions = PAIRWISE_DIMENSIONS

    def __init__(self, judge: Judge, cache: JudgeCache | None = None, template: str = "composlora_pairwise",
                 reask: int = 2, both_orders: bool = True):
        self.judge, self.cache, self.reask, self.both_orders = judge, cache, reask, both_orders
        self.template = load_template(template)

    def compare(self, image_a: ImageLike | ImageBlob, image_b: ImageLike | ImageBlob,
                elements: Sequence[Element]) -> PairwiseResult:
        a, b = ImageBlob.of(image_a), ImageBlob.of(image_b)
        orders = [self._ask_order(a, b, elements, "a")]
        if self.both_orders:
            orders.append(self._ask_order(b, a, elements, "b"))
        failed = [o for o in orders if not o.ok]
        if failed:
            return PairwiseResult(orders=orders, error="; ".join(f"order {o.first}-first: {o.error}" for o in failed))
        mean = {side: {d: sum(o.scores[side][d] for o in orders) / len(orders) for d in self.dimensions} for side in "ab"}
        outcome = {d: outcome_of(mean["a"][d], mean["b"][d]) for d in self.dimensions}
        return PairwiseResult(orders=orders, scores_a=mean["a"], scores_b=mean["b"], outcome=outcome)

    def _ask_order(self, first: ImageBlob, second: ImageBlob, elements, first_side: str) -> OrderResult:
        request = JudgeRequest.build(self.template, [first, second], elements=element_lines(elements))
        got = ask_until_parsed(self.judge, request, parse_pairwise, self.cache, self.reask)
        scores = None
        if got.error is None:
            second_side = "b" if first_side == "a" else "a"
            scores = {first_side: got.parsed.value[1], second_side: got.parsed.value[2]}
        return OrderResult(first=first_side, scores=scores, text=got.text, error=got.error,
                           parse_method=got.parsed.method if got.parsed else None, samples=got.samples, cached=got.cached)


@dataclass
class WinTieLose:
    win: int = 0
    tie: int = 0
    lose: int = 0
    failed: int = 0

    @property
    def n(self) -> int:
        """Comparisons that produced an outcome (the denominator of the rates, as in ComposLoRA's analyze.py)."""
        return self.win + self.tie + self.lose

    def rates(self) -> dict[str, float]:
        return {k: (getattr(self, k) / self.n if self.n else float("nan")) for k in OUTCOMES}


def win_tie_lose(results: Iterable[PairwiseResult], dimensions: Sequence[str] = PAIRWISE_DIMENSIONS) -> dict[str, WinTieLose]:
    """Per dimension, how often A won, tied and lost against B; failed comparisons are counted apart."""
    table = {d: WinTieLose() for d in dimensions}
    for r in results:
        for d in dimensions:
            if r.ok:
                setattr(table[d], r.outcome[d], getattr(table[d], r.outcome[d]) + 1)
            else:
                table[d].failed += 1
    return table


@dataclass
class Vote:
    reference: str  # the reference image's file, or its sha256
    answer: bool | None  # yes / no / None (failed)
    text: str | None
    error: str | None = None


@dataclass
class VoteResult:
    """Votes over the reference images; `approved` is None when no answer could be read."""

    votes: list[Vote] = field(default_factory=list)

    @property
    def yes(self) -> int:
        return sum(v.answer is True for v in self.votes)

    @property
    def no(self) -> int:
        return sum(v.answer is False for v in self.votes)

    @property
    def failed(self) -> int:
        return sum(v.answer is None for v in self.votes)

    @property
    def approved(self) -> bool | None:
        valid = self.yes + self.no
        return None if valid == 0 else self.yes > valid / 2

    def to_dict(self) -> dict:
        return {"approved": self.approved, "yes": self.yes, "no": self.no, "failed": self.failed,
                "votes": [v.__dict__ for v in self.votes]}


def style_name(lora_name: str) -> str:
    """LoRA.rar names a style by its folder with digits stripped ("watercolor2" → "watercolor")."""
    return re.sub(r"\s+", " ", re.sub(r"[\d_]+", " ", lora_name)).strip() or lora_name


class LoRARarYesNo:
    """LoRA.rar's yes/no protocol: `subject(image, refs)` and `style(image, refs, style)` → `VoteResult`."""

    def __init__(self, judge: Judge, cache: JudgeCache | None = None, subject_template: str = "lorarar_subject",
                 style_template: str = "lorarar_style", reask: int = 0):
        self.judge, self.cache, self.reask = judge, cache, reask
        self.subject_template, self.style_template = load_template(subject_template), load_template(style_template)

    def subject(self, image: ImageLike | ImageBlob, references: Sequence[ImageLike | ImageBlob]) -> VoteResult:
        return self._vote(self.subject_template, image, references)

    def style(self, image: ImageLike | ImageBlob, references: Sequence[ImageLike | ImageBlob], style: str) -> VoteResult:
        return self._vote(self.style_template, image, references, style=style)

    def _vote(self, template, image, references, **fields) -> VoteResult:
        test = ImageBlob.of(image)
        result = VoteResult()
        for ref in map(ImageBlob.of, references):
            got = ask_until_parsed(self.judge, JudgeRequest.build(template, [ref, test], **fields), parse_yes_no,
                                   self.cache, self.reask)
            answer = got.parsed.value if got.error is None else None
            result.votes.append(Vote(reference=ref.source or ref.sha256, answer=answer, text=got.text, error=got.error))
        return result


def mars2(subject: VoteResult, style: VoteResult) -> bool | None:
    """LoRA.rar's MARS²: an image counts only when both its subject and its style are approved."""
    if subject.approved is None or style.approved is None:
        return None
    return subject.approved and style.approved
