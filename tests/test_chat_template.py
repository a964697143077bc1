"""The embedded model's chat template: the Jinja kept in tokenizer_config.json (what transformers
and vLLM render) and `nbcompletions.model.render_chat` write the same text."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nbcompletions import RequestError
from nbcompletions.model import CHAT_TEMPLATE, FILES_DIR, chat_messages, render_chat

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Who art thou?"}],
    [
        {"role": "system", "content": "Speak as Hamlet."},
        {"role": "user", "content": "To be?"},
        {"role": "assistant", "content": " Or not to be."},
        {"role": "user", "content": "That is\nthe question: café ✓ 𝄞"},
    ],
    [{"role": "developer", "content": ""}, {"role": "assistant", "content": "<|endoftext|>x"}],
]


#: Open last turns that transformers 4 and 5 cut alike (4 strips the content's whitespace and
#: cuts after it; 5, which vLLM 0.32 runs, cuts where the content ends, as render_chat does).
CONTINUED: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Good morrow"}],
    [{"role": "user", "content": "Hi there"}],
]


def test_continue_final_message_leaves_the_last_turn_open() -> None:
    # Whitespace and an empty content kept as transformers 5 keeps them (checked by hand against
    # 5.19, vLLM 0.32's).
    spaced = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Good  "}]
    assert render_chat(spaced, False, continue_final_message=True) == "USER: Hi\nASSISTANT:  Good  "
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    assert render_chat(empty, False, continue_final_message=True) == "USER: Hi\nASSISTANT: "
    with pytest.raises(RequestError) as info:
        render_chat(CONTINUED[0], True, continue_final_message=True)
    assert info.value.param == "continue_final_message"


def test_render_chat_writes_the_documented_turns() -> None:
    assert render_chat(CONVERSATIONS[1]) == (
        "SYSTEM: Speak as Hamlet.\nUSER: To be?\nASSISTANT:  Or not to be.<|endoftext|>\n"
        "USER: That is\nthe question: café ✓ 𝄞\nASSISTANT:"
    )
    assert render_chat(CONVERSATIONS[0], add_generation_prompt=False) == "USER: Who art thou?\n"


def test_tokenizer_config_carries_the_template() -> None:
    config = json.loads((FILES_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    card = (FILES_DIR / "README.md").read_text()
    assert "**Chat template**" in card
    assert "render_chat" in card


@pytest.mark.parametrize("generation", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_jinja_rendering_equals_render_chat(
    conversation: list[dict[str, str]], generation: bool
) -> None:
    # transformers renders with a sandboxed environment, trim_blocks and lstrip_blocks.
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(CHAT_TEMPLATE)
    assert isinstance(template, jinja2.Template)
    rendered = template.render(messages=conversation, add_generation_prompt=generation)
    assert rendered == render_chat(conversation, add_generation_prompt=generation)


def test_text_parts_are_joined_with_newlines() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert chat_messages([{"role": "user", "content": parts}]) == [
        {"role": "user", "content": "a\nb"}
    ]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, "b"], "messages[1]"),
        ([{"role": "tool", "content": "a"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "\ud800"}], "messages[0].content"),
    ],
)
def test_malformed_messages_name_the_field(messages: Any, param: str) -> None:
    with pytest.raises(RequestError) as info:
        render_chat(messages)
    assert info.value.param == param
    assert param in str(info.value)
    assert "got" in str(info.value)


def _transformers_python() -> str:
    """A Python with transformers, found as test_model_reference finds it; else skip (fail under
    NBC_REQUIRE_TORCH=1, as CI runs)."""
    root = Path(__file__).resolve().parents[1]
    candidates = [
        os.environ.get("NBC_TORCH_PYTHON"),
        os.environ.get("NBC_LMEVAL_PYTHON"),
        str(root / ".venv-lmeval" / "bin" / "python"),
    ]
    for candidate in filter(None, candidates):
        if Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import transformers"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    problem = "no Python with transformers: set NBC_TORCH_PYTHON to compare with it"
    if os.environ.get("NBC_REQUIRE_TORCH") == "1":
        pytest.fail(problem)
    pytest.skip(problem)


def test_transformers_apply_chat_template_equals_render_chat() -> None:
    python = _transformers_python()
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "cases = json.loads(sys.stdin.read())\n"
        "print(json.dumps([tok.apply_chat_template(c, tokenize=False, add_generation_prompt=g,"
        " continue_final_message=f) for c, g, f in cases]))\n"
    )
    cases = [(c, g, False) for c in CONVERSATIONS for g in (True, False)]
    cases += [(c, False, True) for c in CONTINUED]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [python, "-c", script, str(FILES_DIR)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rendered = json.loads(done.stdout.strip().splitlines()[-1])
    assert rendered == [
        render_chat(c, add_generation_prompt=g, continue_final_message=f) for c, g, f in cases
    ]
