"""`paused_gc`: the collector held off while a large answer is parsed and made into frames, and
given back as it was (nested blocks, threads, a program that disabled it itself)."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator

import pytest

from nbcompletions._chat_frames import chat_frames
from nbcompletions._gc_pause import paused_gc
from nbcompletions._parse import PAUSE_GC_BYTES, loads


@pytest.fixture
def gc_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_off_inside_and_on_again_after(gc_enabled: None) -> None:
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block is still open
    assert gc.isenabled()


def test_an_error_inside_gives_the_collector_back(gc_enabled: None) -> None:
    with pytest.raises(ZeroDivisionError), paused_gc():
        _ = 1 / 0
    assert gc.isenabled()


def test_a_program_that_disabled_the_collector_keeps_it_disabled(gc_enabled: None) -> None:
    gc.disable()
    with paused_gc():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_overlapping_pauses_in_threads_enable_it_when_the_last_one_ends(gc_enabled: None) -> None:
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with paused_gc():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with paused_gc():
            second_in.set()
            first_out.wait(5)
            seen["after the first left"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"after the first left": False}
    assert gc.isenabled()


def _chat_body(n_tokens: int) -> bytes:
    entry = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "a" * n_tokens},
        "logprobs": {"content": [entry] * n_tokens},
    }
    return json.dumps({"object": "chat.completion", "choices": [choice]}).encode()


@pytest.mark.parametrize("n_tokens", [3, 2_000])
def test_loads_and_chat_frames_read_the_same_either_side_of_the_size(
    gc_enabled: None, n_tokens: int
) -> None:
    body = _chat_body(n_tokens)
    assert (len(body) >= PAUSE_GC_BYTES) == (n_tokens > 3)
    parsed = loads(body)
    assert gc.isenabled()
    assert parsed == json.loads(body)
    _, tokens, _ = chat_frames(parsed)
    assert gc.isenabled()
    assert tokens["token"].tolist() == ["a"] * n_tokens
