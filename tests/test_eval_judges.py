"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1: answers, faults, retries, the cache,
and the API key never leaving the request header."""

import json
import logging
import threading

import pytest
from PIL import Image

from loraloom.evaluation.cache import JudgeCache
from loraloom.evaluation.errors import JudgeError
from loraloom.evaluation.fakes import FakeChatServer, Fault, brightness_judge, images_in, prompt_in
from loraloom.evaluation.judges import JudgeRequest, ask
from loraloom.evaluation.judges.openai_chat import OpenAIChatJudge
from loraloom.evaluation.prompts import load_template
from loraloom.evaluation.protocols import ComposLoRAPairwise, Element

SECRET = "sk-test-DO-NOT-LEAK-0123456789"
ELEMENTS = [Element("Kamado Nezuko", "character", ("nezuko", "pink kimono")), Element("Watercolor", "style", ("watercolor",))]
GOOD = json.dumps({"image_1": {"composition_quality": 7.5, "image_quality": 6},
                   "image_2": {"composition_quality": 5, "image_quality": 8}})


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, gray in enumerate((200, 60)):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (24, 16), (gray, gray, gray)).save(p)
        paths.append(p)
    return paths


def judge_for(server, **kw):
    kw.setdefault("backoff", 0.001)
    kw.setdefault("timeout", 5.0)
    return OpenAIChatJudge("fake-vlm", base_url=server.url, api_key_env="LORALOOM_TEST_KEY", **kw)


def request_for(images):
    return JudgeRequest.build(load_template("composlora_pairwise"), images,
                              elements="1. character (Kamado Nezuko): nezuko")


def test_request_format_text_then_images_with_key_header(images, monkeypatch):
    monkeypatch.setenv("LORALOOM_TEST_KEY", SECRET)
    with FakeChatServer(lambda body, headers, n: GOOD) as server:
        judge = judge_for(server, temperature=1.0, max_tokens=2048, seed=7)
        text = judge.complete(request_for(images))
    assert text == GOOD and judge.requests_sent == 1
    body, headers = server.requests[0], server.headers[0]
    assert body["model"] == "fake-vlm" and body["temperature"] == 1.0 and body["max_tokens"] == 2048 and body["seed"] == 7
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert [im.getpixel((0, 0)) for im in images_in(body)] == [(200, 200, 200), (60, 60, 60)]
    assert "nezuko" in prompt_in(body) and "composition_quality" in prompt_in(body)
    assert headers.get("Authorization") == f"Bearer {SECRET}"
    assert SECRET not in repr(judge)


def test_http_500_is_retried_then_answered(images):
    script = lambda body, headers, n: Fault(500) if n <= 2 else GOOD
    with FakeChatServer(script) as server:
        judge = judge_for(server, max_retries=3)
        assert judge.complete(request_for(images)) == GOOD
    assert judge.requests_sent == 3 and len(server.requests) == 3


def test_retry_after_and_backoff_delays(images):
    delays = []
    script = lambda body, headers, n: Fault(429, headers={"Retry-After": "3"}) if n == 1 else Fault(503) if n == 2 else GOOD
    with FakeChatServer(script) as server:
        judge = judge_for(server, max_retries=3, backoff=0.5, backoff_max=10, sleep=delays.append)
        judge.complete(request_for(images))
    assert delays == [3.0, 1.0]  # Retry-After honoured, then exponential: 0.5 · 2^1


def test_bounded_retries_then_failure_recorded_and_run_goes_on(images, tmp_path):
    with FakeChatServer(lambda body, headers, n: Fault(500)) as server:
        judge = judge_for(server, max_retries=2)
        cache = JudgeCache(tmp_path / "cache.jsonl")
        answer = ask(judge, request_for(images), cache)
    assert not answer.ok and answer.text is None and "HTTP 500" in answer.error and "3 attempts" in answer.error
    assert len(server.requests) == 3
    lines = [json.loads(l) for l in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert [l["status"] for l in lines] == ["error"] and "HTTP 500" in lines[0]["error"]
    # the failure is not reused: the next run asks again (and this time the server answers)
    with FakeChatServer(lambda body, headers, n: GOOD) as server:
        again = ask(judge_for(server), request_for(images), JudgeCache(tmp_path / "cache.jsonl"))
    assert again.ok and not again.cached and len(server.requests) == 1


def test_timeout_is_bounded(images):
    """The per-request timeout ends the wait, not the server: the server holds every request until the test lets it
    go, so the client can only get out through its own timeout (no clock is read here)."""
    release, answered, delays = threading.Event(), [], []

    def held(body, headers, n):
        release.wait(timeout=120)  # only a safety net: without a client timeout the call below would get GOOD
        answered.append(n)
        return GOOD

    with FakeChatServer(held) as server:
        judge = judge_for(server, timeout=0.2, max_retries=1, sleep=delays.append)
        try:
            with pytest.raises(JudgeError, match="timed out") as info:
                judge.complete(request_for(images))
            assert answered == []  # the client gave up on both attempts while the server still held them
        finally:
            release.set()
    assert info.value.attempts == 2 and judge.requests_sent == 2 and delays == [0.001]  # one backoff, then gave up


def test_malformed_response_body_is_retried_then_fails(images):
    script = lambda body, headers, n: Fault(200, "{not json" if n % 2 else '{"choices": []}')
    with FakeChatServer(script) as server:
        with pytest.raises(JudgeError, match="malformed response"):
            judge_for(server, max_retries=2).complete(request_for(images))
    assert len(server.requests) == 3


def test_client_errors_fail_at_once_with_a_fix(images):
    with FakeChatServer(lambda body, headers, n: Fault(401, '{"error": "bad key"}')) as server:
        with pytest.raises(JudgeError, match="LORALOOM_TEST_KEY") as info:
            judge_for(server, max_retries=3).complete(request_for(images))
    assert len(server.requests) == 1 and info.value.attempts == 1


def test_missing_scores_are_a_recorded_failure_never_a_guess(images, tmp_path):
    vague = "Image 1 is nicer overall, image 2 has better lighting."
    with FakeChatServer(lambda body, headers, n: vague) as server:
        protocol = ComposLoRAPairwise(judge_for(server), JudgeCache(tmp_path / "c.jsonl"), reask=1)
        result = protocol.compare(images[0], images[1], ELEMENTS)
    assert not result.ok and result.scores_a is None and result.outcome is None
    assert all(o.text == vague and "unparseable" in o.error for o in result.orders)
    assert len(server.requests) == 4  # 2 orders × (ask + 1 re-ask)
    # the raw answers are kept in the cache; a re-run replays them and sends nothing
    with FakeChatServer(lambda body, headers, n: GOOD) as server:
        again = ComposLoRAPairwise(judge_for(server), JudgeCache(tmp_path / "c.jsonl"), reask=1).compare(images[0], images[1], ELEMENTS)
    assert len(server.requests) == 0 and not again.ok


def test_second_run_sends_zero_requests(images, tmp_path):
    with FakeChatServer(brightness_judge) as server:
        first = ComposLoRAPairwise(judge_for(server), JudgeCache(tmp_path / "cache.jsonl")).compare(images[0], images[1], ELEMENTS)
        assert len(server.requests) == 2
        judge = judge_for(server)
        second = ComposLoRAPairwise(judge, JudgeCache(tmp_path / "cache.jsonl")).compare(images[0], images[1], ELEMENTS)
        assert len(server.requests) == 2 and judge.requests_sent == 0
        assert second.to_dict()["scores_a"] == first.scores_a and all(o.cached == 1 for o in second.orders)
        # another decoding parameter is another question
        ComposLoRAPairwise(judge_for(server, temperature=0.0), JudgeCache(tmp_path / "cache.jsonl")).compare(images[0], images[1], ELEMENTS)
        assert len(server.requests) == 4


def test_cache_survives_a_torn_last_line(images, tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    with FakeChatServer(lambda body, headers, n: GOOD) as server:
        ask(judge_for(server), request_for(images), JudgeCache(path))
    with open(path, "a") as f:
        f.write('{"key": "abc", "status": "ans')  # a crash mid-write
    with caplog.at_level(logging.WARNING):
        cache = JudgeCache(path)
    assert len(cache) == 1 and "torn" in caplog.text


def test_api_key_never_logged_cached_or_written(images, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("LORALOOM_TEST_KEY", SECRET)

    def leaky(body, headers, n):  # a server that echoes the Authorization header back, in errors and answers
        auth = headers.get("Authorization", "")
        if n == 2:
            return f"{GOOD} (seen {auth})"
        return Fault(503 if n == 1 else 400, json.dumps({"error": f"cannot serve {auth}"}))

    cache_path = tmp_path / "cache.jsonl"
    with caplog.at_level(logging.DEBUG), FakeChatServer(leaky) as server:
        judge = judge_for(server, max_retries=1)
        answer = ask(judge, request_for(images), JudgeCache(cache_path))  # 503 (retried), then an answer
        failed = ask(judge, request_for(images[::-1]), JudgeCache(cache_path))  # 400: recorded failure
    assert answer.ok and "***" in answer.text and SECRET not in answer.text
    assert not failed.ok and "HTTP 400" in failed.error and "***" in failed.error
    assert all(h["Authorization"] == f"Bearer {SECRET}" for h in server.headers)  # it was sent …
    out = capsys.readouterr()
    for where in (cache_path.read_text(), caplog.text, out.out, out.err, repr(judge), str(judge.decoding())):
        assert SECRET not in where  # … and nowhere else


def test_images_sent_downscaled_when_asked(images, tmp_path):
    with FakeChatServer(lambda body, headers, n: GOOD) as server:
        cache = JudgeCache(tmp_path / "c.jsonl")
        ask(judge_for(server, image_max_side=12), request_for(images), cache)
        ask(judge_for(server), request_for(images), cache)  # another image size is another question
    assert [im.size for im in images_in(server.requests[0])] == [(12, 8), (12, 8)]
    assert [im.size for im in images_in(server.requests[1])] == [(24, 16), (24, 16)]
