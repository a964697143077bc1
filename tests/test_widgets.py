"""Widgets, tested by setting their state in Python (no browser: tests/test_browser.py renders)."""

from __future__ import annotations

import html
import json
from typing import Any

import pandas as pd
import pytest
from helpers import mock_client
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcompletions import CompletionRequest, Limits, RequestError
from nbcompletions.widgets import (
    parse_logit_bias,
    parse_stop,
    parse_values,
    playground_request,
)

FAKE_KEY = "sk-nbc-test-NEVER-SYNC-THIS-KEY-1234567890"


def _state(**changes: Any) -> dict[str, Any]:
    state: dict[str, Any] = {
        "prompt": "To be",
        "model": "nbc-shakespeare",
        "temperature": 1.0,
        "top_p": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "logprobs": 5,
        "max_tokens": 16,
        "n": 1,
        "best_of": 1,
        "seed": "",
        "suffix": "",
        "echo": False,
        "stream": False,
        "stop": ["", "", "", ""],
        "logit_bias": "",
    }
    state.update(changes)
    return state


# -- pure state -> request -------------------------------------------------------------------------


def test_default_state_sends_only_the_core_fields() -> None:
    request = playground_request(_state())
    assert request.to_body() == {
        "model": "nbc-shakespeare",
        "prompt": "To be",
        "logprobs": 5,
        "max_tokens": 16,
        "temperature": 1.0,
        "top_p": 1.0,
    }


def test_every_control_reaches_its_field() -> None:
    request = playground_request(
        _state(
            temperature=0.7,
            top_p=0.9,
            frequency_penalty=0.5,
            presence_penalty=-1.5,
            logprobs=None,
            max_tokens=3,
            n=2,
            best_of=3,
            seed=" 42 ",
            suffix="END",
            echo=True,
            stop=["\\n", "", "the end", ""],
            logit_bias="50256: -100\n7: 2.5",
        )
    )
    assert request == CompletionRequest(
        prompt="To be",
        model="nbc-shakespeare",
        temperature=0.7,
        top_p=0.9,
        frequency_penalty=0.5,
        presence_penalty=-1.5,
        max_tokens=3,
        n=2,
        best_of=3,
        seed=42,
        suffix="END",
        echo=True,
        stop=["\n", "the end"],
        logit_bias={"50256": -100, "7": 2.5},
    )
    assert request.logprobs is None


def test_stream_asks_for_usage() -> None:
    request = playground_request(_state(stream=True))
    assert request.stream is True
    assert request.stream_options == {"include_usage": True}


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"stream": True, "best_of": 2}, "best_of"),
        ({"seed": "forty-two"}, "seed"),
        ({"logit_bias": "50256 -100"}, "logit_bias"),
        ({"logit_bias": "50256: -101"}, "logit_bias"),
        ({"logit_bias": "50256: lots"}, "logit_bias"),
        ({"logprobs": 6}, "logprobs"),
    ],
)
def test_invalid_state_names_the_field(changes: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as info:
        playground_request(_state(**changes))
    assert info.value.param == param
    assert param in str(info.value)


def test_logprobs_cap_follows_the_limits() -> None:
    assert playground_request(_state(logprobs=20), limits=Limits.vllm()).logprobs == 20
    with pytest.raises(RequestError, match="logprobs"):
        playground_request(_state(logprobs=21), limits=Limits.vllm())


def test_stop_escapes_and_blanks() -> None:
    assert parse_stop(["", "", ""]) is None
    assert parse_stop(["\\n\\n", "a\\tb", "back\\\\n", "é"]) == ["\n\n", "a\tb", "back\\n", "é"]


def test_logit_bias_text_keys_use_the_tokenizer() -> None:
    vocabulary = {" the": [262], "the": [1169], "\n": [198], "hello world": [31373, 995]}
    calls: list[str] = []

    def encode(text: str) -> list[int]:
        calls.append(text)
        return vocabulary[text]

    bias = parse_logit_bias(
        '" the": -100\nthe: 5\n"\\n": 1\n# a comment\n\nhello world: -3\n42: 0', encode
    )
    assert bias == {"262": -100, "1169": 5, "198": 1, "31373": -3, "995": -3, "42": 0}
    assert calls == [" the", "the", "\n", "hello world"]


def test_logit_bias_text_without_a_tokenizer_asks_for_ids() -> None:
    assert parse_logit_bias("42: 1") == {"42": 1}
    with pytest.raises(RequestError, match="token ids") as info:
        parse_logit_bias('" the": 1')
    assert info.value.param == "logit_bias"


def test_logit_bias_bad_quoted_text() -> None:
    with pytest.raises(RequestError, match="line 2"):
        parse_logit_bias('1: 1\n"\\x": 1', lambda text: [1])


def test_parse_values_types_and_errors() -> None:
    assert parse_values("temperature", "0, 0.5,1 ,") == [0.0, 0.5, 1.0]
    assert parse_values("max_tokens", "1,2") == [1, 2]
    assert parse_values("stop", "\\n, .") == ["\n", "."]
    with pytest.raises(RequestError, match="max_tokens values must each be an integer"):
        parse_values("max_tokens", "1, 2.5")
    with pytest.raises(RequestError, match="temperature: give at least one value"):
        parse_values("temperature", " , ")


def test_request_body_is_json() -> None:
    body = playground_request(_state(stop=["\\n", "", "", ""], logit_bias="1: 1")).to_body()
    assert json.loads(json.dumps(body)) == body


# -- widgets with a client -------------------------------------------------------------------------


def _all_widgets(root: Any) -> list[Any]:
    """Every widget reachable from ``root`` through children and widget-valued traits."""
    import ipywidgets

    seen: dict[str, Any] = {}
    stack = [root]
    while stack:
        widget = stack.pop()
        if widget.model_id in seen:
            continue
        seen[widget.model_id] = widget
        for name in widget.keys:
            value = getattr(widget, name)
            items = value if isinstance(value, list | tuple) else [value]
            stack.extend(item for item in items if isinstance(item, ipywidgets.Widget))
    return list(seen.values())


def _synced_state(root: Any) -> str:
    return json.dumps([w.get_state() for w in _all_widgets(root)], default=str)


def _refusing_client(seen: list[Any], status: int = 401) -> Any:
    """A Client whose every request is answered with an error (fault injection)."""
    import httpx

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            status,
            json={
                "error": {
                    "message": "Incorrect API key provided"
                    if status == 401
                    else "the server broke",
                    "type": "invalid_request_error" if status == 401 else "server_error",
                    "param": None,
                    "code": None,
                }
            },
        )

    return mock_client(
        answer,
        base_url="http://never-contacted.invalid/v1",
        api_key=FAKE_KEY,
        model="nbc-shakespeare",
        max_retries=0,
    )


def test_no_api_key_in_widget_state_or_repr() -> None:
    from nbcompletions.widgets import Playground, SweepBuilder

    seen: list[Any] = []
    client = _refusing_client(seen)
    playground = Playground(client, prompt="To be")
    builder = SweepBuilder(client, prompt="To be")
    playground.run()
    # The key was really used (so it was there to leak) ...
    assert seen
    assert all(r.headers["authorization"] == f"Bearer {FAKE_KEY}" for r in seen)
    # ... and the server's refusal is shown, but the key is in no synced trait of any child.
    assert "401" in playground.error.value
    for root in (playground, builder):
        assert len(_all_widgets(root)) > 20
        assert FAKE_KEY not in _synced_state(root)
        assert FAKE_KEY not in repr(root)
    assert FAKE_KEY[-10:] not in _synced_state(playground)


@pytest.mark.slow
def test_no_api_key_in_widget_state_after_a_real_run(embedded_engine: Any) -> None:
    import httpx

    from nbcompletions import Client
    from nbcompletions.server import create_app
    from nbcompletions.widgets import Playground, SweepBuilder

    app = create_app(embedded_engine, api_key=FAKE_KEY)  # the server demands the key
    client = Client(
        "http://keyed.test/v1",
        api_key=FAKE_KEY,
        model="nbc-shakespeare",
        transport=httpx.ASGITransport(app=app),
    )
    try:
        playground = Playground(client, prompt="ROMEO:", max_tokens=4)
        playground.stream.value = True
        assert playground.run() is not None, playground.error.value
        builder = SweepBuilder(
            client, prompt="ROMEO:", max_tokens=2, repeats=1, axes={"temperature": "0, 1"}
        )
        assert builder.run() is not None, builder.error.value
        for root in (playground, builder):
            assert FAKE_KEY not in _synced_state(root)
            assert FAKE_KEY not in repr(root)
    finally:
        client.close()


@pytest.mark.slow
def test_no_credentials_from_the_base_url_in_widget_state_or_repr(embedded_engine: Any) -> None:
    import httpx

    from nbcompletions import Client
    from nbcompletions.server import create_app
    from nbcompletions.widgets import Playground, SweepBuilder

    secret = "sk-in-the-url-0123456789"
    client = Client(
        f"http://user:{secret}@keyed.test/v1",
        model="nbc-shakespeare",
        transport=httpx.ASGITransport(app=create_app(embedded_engine)),
    )
    try:
        playground = Playground(client, prompt="ROMEO:", max_tokens=2)
        assert playground.run() is not None, playground.error.value
        builder = SweepBuilder(
            client, prompt="ROMEO:", max_tokens=2, repeats=1, axes={"temperature": "0, 1"}
        )
        assert builder.run() is not None, builder.error.value
        for root in (playground, builder):
            assert secret not in _synced_state(root)
            assert secret not in repr(root)
            assert "keyed.test" in repr(root)
    finally:
        client.close()


def test_default_client_is_the_embedded_model(embedded_engine: Any) -> None:
    from nbcompletions.widgets import Playground

    playground = Playground()
    assert playground.model.value == "nbc-shakespeare"
    assert "http://embedded/v1" in repr(playground)


def test_server_error_appears_in_the_widget() -> None:
    from nbcompletions import APIError
    from nbcompletions.widgets import Playground

    seen: list[Any] = []
    playground = Playground(_refusing_client(seen, status=500), prompt="To be")
    assert playground.model.options == ("nbc-shakespeare",)  # /v1/models failed: the client's
    assert "the server broke" in playground.error.value
    assert playground.run() is None
    assert isinstance(playground.last_error, APIError)
    assert "500" in playground.error.value
    assert "the server broke" in playground.error.value
    assert playground.result is None
    assert not playground.run_button.disabled


def test_button_click_shows_errors_instead_of_raising() -> None:
    from nbcompletions.widgets import Playground

    playground = Playground(_refusing_client([], status=500), prompt="To be")
    playground.run_button.click()  # a callback's exception would be lost in the kernel log
    assert "the server broke" in playground.error.value


@pytest.fixture
def playground(embedded_client: Any) -> Any:
    from nbcompletions.widgets import Playground

    return Playground(embedded_client, prompt="ROMEO:", max_tokens=6)


def test_controls_set_the_request(playground: Any) -> None:
    assert playground.model.options == ("nbc-shakespeare",)
    playground.temperature.value = 0.3
    playground.top_p.value = 0.8
    playground.frequency_penalty.value = 1.0
    playground.presence_penalty.value = 0.5
    playground.logprobs.value = 2
    playground.max_tokens.value = 9
    playground.n.value = 2
    playground.best_of.value = 3
    playground.seed.value = "7"
    playground.echo.value = True
    playground.stop[1].value = "\\n"
    playground.logit_bias.value = "0: -100"
    assert playground.request == CompletionRequest(
        prompt="ROMEO:",
        model="nbc-shakespeare",
        temperature=0.3,
        top_p=0.8,
        frequency_penalty=1.0,
        presence_penalty=0.5,
        logprobs=2,
        max_tokens=9,
        n=2,
        best_of=3,
        seed=7,
        echo=True,
        stop=["\n"],
        logit_bias={"0": -100},
    )
    assert playground.error.value == ""
    assert "<code>0</code>" in playground.logit_bias_preview.value


def test_slider_ranges_are_the_api_ranges(playground: Any) -> None:
    assert (playground.temperature.min, playground.temperature.max) == (0.0, 2.0)
    assert (playground.top_p.min, playground.top_p.max) == (0.0, 1.0)
    for slider in (playground.frequency_penalty, playground.presence_penalty):
        assert (slider.min, slider.max) == (-2.0, 2.0)
    assert [value for _, value in playground.logprobs.options] == [None, 0, 1, 2, 3, 4, 5]
    assert len(playground.stop) == 4


@pytest.mark.parametrize(
    ("control", "value", "param"),
    [
        ("max_tokens", -3, "max_tokens"),
        ("best_of", 0, "best_of"),
        ("seed", "abc", "seed"),
        ("logit_bias", "1: 500", "logit_bias"),
        ("logit_bias", '"ROMEO": ten', "logit_bias"),
        ("logit_bias", "4096: 1", "logit_bias"),  # the embedded model's vocabulary is 0..4095
    ],
)
def test_invalid_setting_is_shown_and_not_sent(
    playground: Any, control: str, value: Any, param: str
) -> None:
    getattr(playground, control).value = value
    assert param in playground.error.value
    assert isinstance(playground.last_error, RequestError)
    with pytest.raises(RequestError):
        playground.request  # noqa: B018 - the property is what is tested
    assert playground.run() is None
    assert playground.result is None
    # Fixing the value clears the error.
    getattr(playground, control).value = {
        "max_tokens": 4,
        "best_of": 1,
        "seed": "",
        "logit_bias": "",
    }[control]
    assert playground.error.value == ""


def test_run_shows_tokens_frames_and_plots(playground: Any) -> None:
    playground.seed.value = "1"  # unseeded, the model may sample its end-of-text token early
    completion = playground.run()
    assert completion is not None
    assert playground.result is completion
    assert playground.error.value == ""
    assert "run #1:" in playground.status.value
    assert completion.usage["completion_tokens"] == len(completion.tokens) == 6
    # Highlighted tokens, with the alternatives in each token's popup.
    assert 'class="nbc-tokens"' in playground.highlighted.value
    assert 'class="nbc-popup"' in playground.highlighted.value
    assert "alternatives:" in playground.highlighted.value
    for name in ("choices", "tokens", "alternatives"):
        assert "<table" in playground.frames_tabs[name].value
    for name, output in playground.plot_outputs.items():
        (item,) = output.outputs
        assert "application/vnd.plotly.v1+json" in item["data"], name
        assert item["data"]["application/vnd.plotly.v1+json"]["data"], name
    assert '"max_tokens": 6' in playground.request_view.value
    assert json.dumps([o.outputs for o in playground.plot_outputs.values()])  # JSON-safe


def test_run_without_logprobs_shows_plain_text(playground: Any) -> None:
    playground.logprobs.value = None
    completion = playground.run()
    assert completion is not None
    assert "set logprobs" in playground.plot_outputs["entropy"].outputs[0]["data"]["text/plain"]
    assert playground.highlighted.value.count("<pre") == 1


def test_stream_shows_text_as_it_arrives(playground: Any) -> None:
    values: list[str] = []
    playground.streamed.observe(lambda change: values.append(change["new"]), names=["value"])
    playground.stream.value = True
    playground.max_tokens.value = 8
    playground.seed.value = "1"  # unseeded, the model may sample its end-of-text token early
    completion = playground.run()
    assert completion is not None
    assert completion.finish_reason == "length"
    assert completion.usage["completion_tokens"] == 8
    # One update per piece as it arrived, the last holding the whole text, then cleared.
    streamed = [value for value in values if value]
    assert len(streamed) >= 2
    assert html.escape(completion.text) in streamed[-1]
    assert values[-1] == ""
    assert 'class="nbc-tokens"' in playground.highlighted.value
    assert playground.streamed.value == ""  # replaced by the highlighted result


def test_a_streamed_run_clears_the_previous_runs_text_while_it_streams(playground: Any) -> None:
    # Issue 20: a streamed run showed the previous run's highlighted text (and its open popup)
    # under the new text as it streamed in.
    playground.seed.value = "1"
    assert playground.run() is not None
    assert 'class="nbc-tokens"' in playground.highlighted.value
    seen: list[tuple[str, str, str]] = []
    playground.streamed.observe(
        lambda change: seen.append(
            (
                change["new"],
                playground.highlighted.value,
                playground.frames_tabs["tokens"].value,
            )
        ),
        names=["value"],
    )
    playground.stream.value = True
    playground.seed.value = "2"
    assert playground.run() is not None
    while_streaming = [(h, t) for text, h, t in seen if text]
    assert while_streaming
    assert all(highlighted == "" and tokens == "" for highlighted, tokens in while_streaming)
    assert 'class="nbc-tokens"' in playground.highlighted.value


def test_choices_tab_leaves_out_empty_columns_and_gives_the_text_room(playground: Any) -> None:
    from nbcompletions.widgets._display import frame_html

    playground.seed.value = "1"
    completion = playground.run()
    assert completion is not None
    choices = completion.choices
    empty = [c for c in choices.columns if choices[c].isna().all()]
    assert empty  # the embedded model's choices carry columns no one filled in
    tab = playground.frames_tabs["choices"].value
    for column in empty:
        assert f"<th>{column}</th>" not in tab
    assert "not shown, empty in every row: " + ", ".join(empty) in tab
    assert 'style="min-width:24em' in tab
    # Escaped like any cell: markup in a text is shown, not rendered.
    frame = pd.DataFrame({"text": ["<b>bold</b> & more"], "index": [0], "note": ["<i>"]})
    table = frame_html(frame)
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in table
    assert "&lt;i&gt;" in table
    assert "<b>bold" not in table


def test_logit_bias_text_goes_through_the_tokenizer(playground: Any, embedded_engine: Any) -> None:
    (forced,) = embedded_engine.encode(" the")
    playground.logit_bias.value = '" the": 100'
    assert playground.request.logit_bias == {str(forced): 100}
    assert "the" in playground.logit_bias_preview.value
    completion = playground.run()
    assert completion is not None
    assert completion.text == " the" * 6


def test_model_side_error_is_shown(playground: Any) -> None:
    playground.suffix.value = "THE END"  # the embedded model cannot insert
    assert playground.run() is None
    assert "suffix" in playground.error.value


def test_a_failed_run_clears_the_previous_result(playground: Any) -> None:
    assert playground.run() is not None
    assert playground.highlighted.value
    playground.suffix.value = "THE END"  # a request the embedded model refuses (server side)
    assert playground.run() is None
    # The request tab shows the failed request; nothing from the earlier run stays under the error.
    assert '"suffix": "THE END"' in playground.request_view.value
    assert playground.result is None
    assert playground.highlighted.value == ""
    assert all(tab.value == "" for tab in playground.frames_tabs.values())
    assert all(output.outputs == () for output in playground.plot_outputs.values())
    assert "no result: the request failed" in playground.status.value
    assert "suffix" in playground.error.value

    playground.suffix.value = ""
    assert playground.run() is not None
    assert playground.highlighted.value
    playground.max_tokens.value = -5  # invalid: never sent
    assert playground.run() is None
    assert playground.highlighted.value == ""
    assert playground.request_view.value == ""
    assert "no result: the settings are invalid" in playground.status.value


def test_repr_is_cheap(playground: Any) -> None:
    assert repr(playground).startswith("Playground(endpoint=")
    assert len(repr(playground)) < 200


# -- SweepBuilder ---------------------------------------------------------------------------------


@pytest.fixture
def builder(embedded_client: Any) -> Any:
    from nbcompletions.widgets import SweepBuilder

    return SweepBuilder(
        embedded_client,
        prompt=["ROMEO:", "JULIET:"],
        max_tokens=3,
        repeats=2,
        axes={"temperature": "0.5, 1.5"},
    )


def test_builder_counts_and_estimates_before_running(builder: Any, embedded_client: Any) -> None:
    from nbcompletions._grid import estimate_tokens, expand_grid

    settings = builder.settings
    assert settings.n_requests == 2 * 2 * 2
    grid = expand_grid(
        embedded_client,
        ["ROMEO:", "JULIET:"],
        repeats=2,
        temperature=[0.5, 1.5],
        max_tokens=3,
        logprobs=1,
        model="nbc-shakespeare",
    )
    assert (settings.token_estimate, settings.estimate_method) == estimate_tokens(
        [p.request for p in grid.points], model="nbc-shakespeare"
    )
    assert "<b>8</b> requests" in builder.summary.value
    builder.axis_fields[1].value = "top_p"
    builder.axis_values[1].value = "0.5, 0.9, 1"
    assert builder.settings.n_requests == 24
    assert "<b>24</b> requests" in builder.summary.value


@pytest.mark.parametrize(
    ("axis", "values", "param"),
    [
        ("temperature", "0.5, hot", "temperature"),
        ("temperature", "0.5, 3", "temperature"),
        ("max_tokens", "1.5", "max_tokens"),
    ],
)
def test_builder_invalid_axis_is_shown(builder: Any, axis: str, values: str, param: str) -> None:
    builder.axis_fields[0].value = axis
    builder.axis_values[0].value = values
    assert param in builder.error.value
    assert builder.summary.value == ""
    assert builder.run() is None


def test_split_prompts_cuts_only_at_separator_lines() -> None:
    from nbcompletions.widgets import join_prompts, split_prompts

    assert split_prompts("ROMEO:\nJULIET:") == ["ROMEO:\nJULIET:"]  # newlines stay in a prompt
    assert split_prompts("ROMEO:\n\n---\nJULIET:\n") == ["ROMEO:\n", "JULIET:\n"]
    assert split_prompts("a\n---\nb\n---\n") == ["a", "b"]  # a trailing separator: no prompt
    assert split_prompts("---\na") == ["a"]
    assert split_prompts("a\n----\nb --- c") == ["a\n----\nb --- c"]  # only a bare --- line
    assert split_prompts(" \n---\n\n") == []
    prompts = ["ROMEO:\n", "JULIET:\nO Romeo,\n", "\n\nNURSE:"]
    assert split_prompts(join_prompts(prompts)) == prompts
    with pytest.raises(ValueError, match=r"prompt 1 holds a line '---'"):
        join_prompts(["a", "notes\n---\nmore"])
    with pytest.raises(ValueError, match=r"prompt 0 is empty"):
        join_prompts([" "])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.text(alphabet="ab-\n ", min_size=1, max_size=12).filter(
            lambda t: t.strip() and "\n---\n" not in f"\n{t}\n"
        ),
        min_size=1,
        max_size=4,
    )
)
def test_join_then_split_gives_the_prompts_back(prompts: list[str]) -> None:
    from nbcompletions.widgets import join_prompts, split_prompts

    assert split_prompts(join_prompts(prompts)) == prompts


def test_builder_string_prompt_is_one_prompt_and_a_list_is_several(embedded_client: Any) -> None:
    from nbcompletions.widgets import SweepBuilder

    one = SweepBuilder(embedded_client, prompt="ROMEO:\nJULIET:", axes={"temperature": "1"})
    assert one.settings.kwargs["prompt"] == "ROMEO:\nJULIET:"
    assert one.settings.n_requests == 3
    assert "<code>ROMEO:↵JULIET:</code>" in one.summary.value
    several = SweepBuilder(embedded_client, prompt=["ROMEO:\n", "JULIET:\n"], repeats=1)
    assert several.prompts.value == "ROMEO:\n\n---\nJULIET:\n"
    assert several.settings.kwargs["prompt"] == ["ROMEO:\n", "JULIET:\n"]
    assert "2 prompts" in several.summary.value
    assert "<code>ROMEO:↵</code> · <code>JULIET:↵</code>" in several.summary.value
    # Typed into the box: a line holding only --- starts another prompt.
    several.prompts.value = "KING:\n---\nQUEEN:\n---\nFOOL:"
    assert several.settings.kwargs["prompt"] == ["KING:", "QUEEN:", "FOOL:"]
    several.prompts.value = "\n---\n"
    assert "give at least one prompt" in several.error.value
    with pytest.raises(ValueError, match=r"reads as the separator"):
        SweepBuilder(embedded_client, prompt=["a\n---\nb"])


def test_builder_field_on_two_axes_is_shown(builder: Any) -> None:
    builder.axis_fields[1].value = "temperature"
    builder.axis_values[1].value = "1"
    assert "temperature is chosen for two axes" in builder.error.value


def test_builder_axis_set_to_none_drops_its_values(builder: Any) -> None:
    builder.axis_fields[1].value = "top_p"
    assert not builder.axis_values[1].disabled
    builder.axis_values[1].value = "0.5, 0.9"
    assert builder.settings.n_requests == 16
    builder.axis_fields[1].value = ""
    assert builder.axis_values[1].value == ""
    assert builder.axis_values[1].disabled
    # Chosen again (another field), the box is empty: the old values were for top_p.
    builder.axis_fields[1].value = "presence_penalty"
    assert builder.axis_values[1].value == ""
    assert not builder.axis_values[1].disabled
    assert builder.axis_values[2].disabled  # "(none)" from the start


def test_builder_clears_its_chart_under_a_new_validation_error(builder: Any) -> None:
    assert builder.run() is not None
    assert builder.plot.outputs
    builder.axis_values[0].value = "0.5, hot"
    assert "temperature" in builder.error.value
    assert builder.plot.outputs == ()
    assert "chart cleared" in builder.status.value
    # Changing y redraws nothing under the error; .result still holds the last run.
    builder.y.value = "n_tokens"
    assert builder.plot.outputs == ()
    assert builder.result is not None


def test_builder_runs_and_plots(builder: Any, tmp_path: Any) -> None:
    builder.cache.value = str(tmp_path / "sweep.sqlite")
    result = builder.run()
    assert result is not None
    assert builder.result is result
    assert builder.error.value == ""
    assert len(result) == 8
    (item,) = builder.plot.outputs
    figure = item["data"]["application/vnd.plotly.v1+json"]
    assert figure["data"]
    builder.y.value = "n_tokens"
    assert builder.plot.outputs[0] is not item
    # The cache makes a second run free.
    again = builder.run()
    assert again is not None
    assert again.n_cached == 8
    assert "8 from the cache" in builder.status.value


# -- the Playground's chat mode --------------------------------------------------------------------

CHAT = [
    {"role": "system", "content": "Speak as a guard."},
    {"role": "user", "content": "Who is there?"},
]


@pytest.fixture
def chat_playground(embedded_client: Any) -> Any:
    from nbcompletions.widgets import Playground

    return Playground(embedded_client, mode="chat", messages=CHAT, max_tokens=6)


def test_chat_mode_sends_the_messages_as_a_chat_request(chat_playground: Any) -> None:
    from nbcompletions import ChatRequest

    request = chat_playground.request
    assert isinstance(request, ChatRequest)
    assert request.messages == CHAT
    assert (request.logprobs, request.top_logprobs, request.max_tokens) == (True, 5, 6)
    body = request.to_body()
    assert not {"prompt", "echo", "best_of", "suffix"} & set(body)
    # The prompt box gives way to the messages editor; completion-only fields are off.
    assert chat_playground.prompt.layout.display == "none"
    assert chat_playground.messages.layout.display is None
    assert all(getattr(chat_playground, name).disabled for name in ("echo", "suffix", "best_of"))
    chat_playground.mode.value = "completion"
    assert chat_playground.messages.layout.display == "none"
    assert not chat_playground.echo.disabled
    assert not isinstance(chat_playground.request, ChatRequest)


def test_chat_mode_offers_chats_top_logprobs_cap(chat_playground: Any) -> None:
    # Chat's top_logprobs goes to 20 where the completion cap is 5 (the embedded server's and
    # OpenAI's): the dropdown follows the mode, and a value past 5 is sent in chat mode.
    offered = [k for _, k in chat_playground.logprobs.options if k is not None]
    assert offered == list(range(21))
    chat_playground.logprobs.value = 12
    chat_playground.temperature.value = 0.0
    assert chat_playground.error.value == ""
    assert chat_playground.request.top_logprobs == 12
    completion = chat_playground.run()
    assert completion is not None, chat_playground.error.value
    assert completion.alternatives.groupby("position").size().max() == 12
    chat_playground.mode.value = "completion"
    assert [k for _, k in chat_playground.logprobs.options if k is not None] == list(range(6))
    assert chat_playground.logprobs.value == 5
    assert chat_playground.request.logprobs == 5


def test_messages_editor_adds_edits_and_removes_rows(chat_playground: Any) -> None:
    editor = chat_playground.messages
    row = editor.add()  # after a user turn comes the assistant's
    assert row.role.value == "assistant"
    row.content.value = "Nay, answer me."
    assert editor.add().role.value == "user"
    editor.rows[-1].content.value = "Long live the king!"
    assert [m["role"] for m in chat_playground.request.messages] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    editor.rows[0].role.value = "developer"
    editor.rows[2].remove.click()
    assert chat_playground.request.messages == [
        {"role": "developer", "content": "Speak as a guard."},
        {"role": "user", "content": "Who is there?"},
        {"role": "user", "content": "Long live the king!"},
    ]
    assert editor.children[-1] is editor.add_button  # rows, then the button


def test_a_bad_message_is_shown_and_not_sent(chat_playground: Any) -> None:
    for row in list(chat_playground.messages.rows):
        row.remove.click()
    assert chat_playground.last_error is not None
    assert "messages" in chat_playground.error.value
    assert chat_playground.run() is None


def test_chat_run_shows_tokens_frames_and_plots(chat_playground: Any, embedded_client: Any) -> None:
    chat_playground.temperature.value = 0.0
    completion = chat_playground.run()
    assert completion is not None, chat_playground.error.value
    assert chat_playground.error.value == ""
    assert set(completion.tokens["api"]) == {"chat"}
    assert set(completion.tokens["role"]) == {"assistant"}
    same = embedded_client.chat(CHAT, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=5)
    assert completion.text == same.text
    assert 'class="nbc-tokens"' in chat_playground.highlighted.value
    assert "alternatives:" in chat_playground.highlighted.value
    for name, output in chat_playground.plot_outputs.items():
        (item,) = output.outputs
        assert item["data"]["application/vnd.plotly.v1+json"]["data"], name
    assert '"messages"' in chat_playground.request_view.value


def test_chat_run_streams(chat_playground: Any) -> None:
    chat_playground.stream.value = True
    chat_playground.seed.value = "1"
    completion = chat_playground.run()
    assert completion is not None, chat_playground.error.value
    assert completion.usage["completion_tokens"] == len(completion.tokens) == 6
    assert set(completion.tokens["api"]) == {"chat"}


def test_an_unknown_mode_is_refused() -> None:
    from nbcompletions.widgets import Playground

    client = _refusing_client([])
    with pytest.raises(RequestError, match="completion, chat") as caught:
        Playground(client, mode="responses")
    assert caught.value.param == "mode"


# -- SweepBuilder in chat mode (issue 17) ---------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Who art thou?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What news?\nSpeak."},
    ],
]


def test_conversations_text_round_trips_and_names_a_bad_block() -> None:
    from nbcompletions.widgets import conversations_text, parse_conversations

    text = conversations_text(CONVERSATIONS)
    assert text == "user: Who art thou?\n---\nsystem: Be brief.\nuser: What news?\nSpeak."
    assert parse_conversations(text) == CONVERSATIONS
    assert parse_conversations(" \n---\n") == []
    with pytest.raises(RequestError, match=r"conversation 2 must start with a 'role: content'"):
        parse_conversations("user: hi\n---\nking: kneel")


def test_builder_in_chat_mode_counts_runs_and_plots_conversations(embedded_client: Any) -> None:
    from nbcompletions._grid import estimate_tokens, expand_grid
    from nbcompletions.widgets import SweepBuilder

    builder = SweepBuilder(
        embedded_client,
        messages=CONVERSATIONS,
        max_tokens=3,
        repeats=2,
        axes={"temperature": "0.5, 1.5"},
    )
    settings = builder.settings
    assert settings.kwargs["messages"] == CONVERSATIONS
    assert settings.kwargs["max_completion_tokens"] == 3
    assert (settings.kwargs["logprobs"], settings.kwargs["top_logprobs"]) == (True, 1)
    assert settings.n_requests == 2 * 2 * 2
    grid = expand_grid(
        embedded_client,
        messages=CONVERSATIONS,
        repeats=2,
        temperature=[0.5, 1.5],
        max_completion_tokens=3,
        logprobs=True,
        top_logprobs=1,
        model="nbc-shakespeare",
    )
    assert grid.api == "chat"
    assert (settings.token_estimate, settings.estimate_method) == estimate_tokens(
        [p.request for p in grid.points], model="nbc-shakespeare"
    )
    assert "<b>8</b> requests = 2 conversations" in builder.summary.value
    result = builder.run()
    assert result is not None, builder.error.value
    assert set(result.choices["api"]) == {"chat"}
    assert len(builder.plot.outputs) == 1
    # A box that is no conversation is shown as an error naming messages; nothing runs.
    builder.prompts.value = "Who art thou?"
    assert "messages" in builder.error.value
    assert builder.summary.value == ""
    assert builder.run() is None
