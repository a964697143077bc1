"""Record `transformers`' logits for a GPT-2 model directory (by default the embedded model's).

The numpy inference (`nbcompletions.model._gpt2`) must agree with transformers' ``GPT2LMHeadModel``
to 1e-4. torch and transformers are 1 GB the everyday test set-up should not install, so their
answer is kept in a small fixture, ``tests/fixtures/reference_logits.json``, that
``tests/test_model_reference.py`` checks against on every run; the same test runs this script live
under a Python that has torch (NBC_TORCH_PYTHON; CI points it at ``.venv-lmeval``) and compares.

For each prompt, at 8 positions spread along it, the fixture keeps the logits of the 5 likeliest
tokens, of 8 fixed probe tokens, and the log-sum-exp over the whole vocabulary (so the full
distribution's normaliser, hence every log-probability the API reports, is checked too), plus the
token ids transformers' tokenizer produced, and the sha256 of the weights it was recorded from.

Needs torch and transformers (not in the ``dev`` extra)::

    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch transformers safetensors
    /tmp/torch/bin/python scripts/record_reference_logits.py        # rewrites the fixture
    /tmp/torch/bin/python scripts/record_reference_logits.py --model-dir DIR --out out.json \
        --ids '[[1, 2, 3]]'                                         # any model, given token ids
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FILES_DIR = ROOT / "nbcompletions" / "model" / "files"
FIXTURE = ROOT / "tests" / "fixtures" / "reference_logits.json"

#: Prompts the embedded model knows the shape of (speaker names, verse, a stage direction) and one
#: with multi-byte characters, so partial-UTF-8 tokens are covered.
PROMPTS = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "HAMLET:\nTo be, or not to be, that is the question:",
    "[Exit Ghost.]\n\nFirst Witch. When shall we three meet again",
    "Café naïve – “Juliet” ü €",
)
TOP = 5
PROBES = 8
#: Positions kept per prompt, spread evenly and always including the last (a few KB in all).
POSITIONS = 8


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def probe_ids(vocab_size: int, count: int = PROBES) -> list[int]:
    """Fixed probe token ids: the first and last token and a spread between them."""
    step = max(1, vocab_size // (count - 1))
    return sorted({0, vocab_size - 1, *range(step, vocab_size - 1, step)})[:count]


def kept_positions(length: int, count: int = POSITIONS) -> list[int]:
    """``count`` positions spread evenly over ``length``, the first and the last included."""
    if length <= count:
        return list(range(length))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)})


def record(model_dir: Path, ids: list[list[int]] | None) -> dict[str, Any]:
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(str(model_dir)).float()
    model.eval()
    vocab_size = int(model.config.vocab_size)
    probes = probe_ids(vocab_size)
    prompts: list[dict[str, Any]] = []
    items: list[tuple[str | None, list[Any]]]
    if ids is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
        items = [(text, list(tokenizer(text)["input_ids"])) for text in PROMPTS]
    else:
        items = [(None, list(row)) for row in ids]
    for text, token_ids in items:
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0].double()
        normaliser = torch.logsumexp(logits, -1)
        positions = []
        for at in kept_positions(len(token_ids)):
            row, lse = logits[at], normaliser[at]
            top = torch.topk(row, TOP)
            positions.append(
                {
                    "position": at,
                    "top_ids": top.indices.tolist(),
                    "top_logits": [round(float(v), 6) for v in top.values],
                    "probe_logits": [round(float(row[i]), 6) for i in probes],
                    "logsumexp": round(float(lse), 6),
                }
            )
        prompts.append({"text": text, "ids": token_ids, "positions": positions})
    weights = model_dir / "model.safetensors"
    return {
        "model_sha256": sha256(weights),
        "vocab_size": vocab_size,
        "probe_ids": probes,
        "recorded_with": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
        },
        "prompts": prompts,
    }


def to_json(data: dict[str, Any]) -> str:
    """Compact JSON with one line per prompt position: small, and a re-recording diffs readably."""
    head = {k: v for k, v in data.items() if k != "prompts"}
    lines = ["{", *(f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items())]
    lines.append(' "prompts": [')
    for i, prompt in enumerate(data["prompts"]):
        lines.append(f'  {{"text": {json.dumps(prompt["text"], ensure_ascii=False)},')
        lines.append(f'   "ids": {json.dumps(prompt["ids"], separators=(",", ":"))},')
        lines.append('   "positions": [')
        rows = [json.dumps(p, separators=(",", ":")) for p in prompt["positions"]]
        lines.append(",\n".join(f"    {row}" for row in rows))
        lines.append("  ]}" + ("," if i < len(data["prompts"]) - 1 else ""))
    lines += [" ]", "}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=FILES_DIR)
    parser.add_argument("--out", type=Path, default=FIXTURE, help="'-' writes to stdout")
    parser.add_argument("--ids", help="JSON list of token-id lists (default: the fixed prompts)")
    args = parser.parse_args(argv)
    ids = json.loads(args.ids) if args.ids else None
    try:
        data = record(args.model_dir, ids)
    except ImportError as exc:
        print(
            f"{exc}: this script needs torch and transformers "
            "(pip install torch transformers); they are not in the dev extra",
            file=sys.stderr,
        )
        return 2
    text = to_json(data)
    if str(args.out) == "-":
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out} ({len(text.encode()):,} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
