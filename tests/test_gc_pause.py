"""`paused_gc`: the collector held off while a large answer is parsed and made into frames, and
given back as it was (nested blocks, threads, a program that disabled it itself); `spaced_gc`:
fewer young collections while a live sweep runs, thresholds put back as they were."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from nbcompletions._chat_frames import chat_frames
from nbcompletions._gc_pause import SPACED_THRESHOLD, paused_gc, spaced_gc
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


# -- spaced_gc: fewer young collections while a live sweep has requests in flight ----------------


@pytest.fixture
def default_thresholds() -> Iterator[tuple[int, ...]]:
    was = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield gc.get_threshold()
    gc.set_threshold(*was)


def test_spaced_blocks_raise_the_first_threshold_and_put_it_back(
    default_thresholds: tuple[int, ...],
) -> None:
    with spaced_gc():
        assert gc.get_threshold() == (SPACED_THRESHOLD, 10, 10)
        with spaced_gc():
            assert gc.get_threshold()[0] == SPACED_THRESHOLD
        assert gc.get_threshold()[0] == SPACED_THRESHOLD  # the outer block is still open
    assert gc.get_threshold() == default_thresholds
    with pytest.raises(ZeroDivisionError), spaced_gc():
        _ = 1 / 0
    assert gc.get_threshold() == default_thresholds


def test_thresholds_the_program_chose_are_left_alone(default_thresholds: tuple[int, ...]) -> None:
    gc.set_threshold(0)  # automatic collection off
    with spaced_gc():
        assert gc.get_threshold()[0] == 0
    gc.set_threshold(50_000, 10, 10)
    with spaced_gc():
        assert gc.get_threshold()[0] == 50_000
    gc.set_threshold(700, 10, 10)
    with spaced_gc():
        gc.set_threshold(123, 4, 5)  # changed inside the block: kept, not undone
    assert gc.get_threshold() == (123, 4, 5)


def test_a_live_sweep_sends_under_spaced_collections(
    embedded_client: Any, default_thresholds: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbcompletions import sweep
    from nbcompletions.sweeps import sender

    seen: list[int] = []
    send = sender._LiveRun.send

    async def recording(self: Any, point: Any) -> None:
        seen.append(gc.get_threshold()[0])
        await send(self, point)

    monkeypatch.setattr(sender._LiveRun, "send", recording)
    result = sweep(embedded_client, prompt=["a", "b"], max_tokens=1, progress=False, probe=False)
    assert result.n_failed == 0
    assert seen == [SPACED_THRESHOLD, SPACED_THRESHOLD]
    assert gc.get_threshold() == default_thresholds
