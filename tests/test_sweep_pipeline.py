"""The sweep pipeline's promises (issue 18): no answer without choices counts as ok, writers
sharing one results directory lose and duplicate nothing, shards of a grid merge into the
unsharded run, and Parquet is needed only for Parquet results.

Sweeps run on the embedded model through the real server app and the real client (several
processes: a real `nbcompletions serve`); faults are injected with `httpx.MockTransport`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import mock_client

from nbcompletions import Cache, Client, SweepWarning, expand_grid, load_sweep, sweep
from nbcompletions.server import StreamingASGITransport

MODEL = "nbc-shakespeare"
ROOT = Path(__file__).resolve().parent.parent

GRID: dict[str, Any] = {
    "prompt": {"hamlet": "To be, or not", "king": "My lord,", "again": "To be, or not"},
    "temperature": [0.5, 1.2],
    "max_tokens": 2,
    "logprobs": 2,
    "repeats": 4,
}


@pytest.mark.parametrize("body", [{"choices": "x"}, {}, {"choices": []}, {"choices": [1, "a"]}])
def test_a_200_without_usable_choices_is_an_error_row_not_ok(
    app: Any, tmp_path: Path, body: dict[str, Any]
) -> None:
    real = StreamingASGITransport(app)

    async def faulty(request: httpx.Request) -> httpx.Response:
        if request.content and json.loads(request.content).get("prompt") == "My lord,":
            return httpx.Response(200, json=body)
        return await real.handle_async_request(request)

    cache_path = tmp_path / "cache.sqlite"
    client = Client(
        "http://embedded/v1", model=MODEL, transport=httpx.MockTransport(faulty), max_retries=0
    )
    with client, pytest.warns(SweepWarning, match="invalid_response"):
        # fail_fast=None: the bad answers come back first, which would stop the sweep.
        result = sweep(
            client, **GRID, cache=cache_path, progress=False, probe=False, fail_fast=None
        )
    requests = result.requests
    bad = requests[requests["prompt_id"] == "king"]
    assert len(bad) == 8
    assert (bad["status"] == "error").all()
    assert (bad["error_type"] == "invalid_response").all()
    assert (bad["error_status"] == 200).all()
    assert bad["error"].str.contains("usable choice").all()
    assert (requests[requests["prompt_id"] != "king"]["status"] == "ok").all()
    assert result.usage["failed_requests"] == 8
    # One expected choice row each, error set; nothing of them stored: a re-run asks again.
    king = result.choices[result.choices["prompt_id"] == "king"]
    assert len(king) == 8
    assert king["error"].notna().all()
    with Cache(cache_path) as cache:
        assert len(cache) == 8  # the 8 distinct good requests ("again" copies "hamlet")


def test_token_counts_are_integers_not_bools(tmp_path: Path) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        usage = {"prompt_tokens": True, "completion_tokens": 2, "total_tokens": 2.5}
        return httpx.Response(
            200, json={"id": "x", "choices": [{"index": 0, "text": "hi"}], "usage": usage}
        )

    with mock_client(answer) as client:
        result = sweep(client, prompt=["a", "b"], progress=False, probe=False)
    assert result.usage["prompt_tokens"] == 0  # True is not 1 token
    assert result.usage["completion_tokens"] == 4
    assert result.usage["total_tokens"] == 0
    assert result.requests["prompt_tokens"].isna().all()


def _sharing_script(base: str, cache: Path, results: Path, delay: float) -> str:
    return textwrap.dedent(
        f"""
        import time
        import nbcompletions.sweeps.dataset as dataset
        from nbcompletions import Client, sweep
        dataset.FLUSH_EVERY = 7  # many parts, many renames
        time.sleep({delay!r})  # started one after another, as people do
        client = Client({base!r}, model={MODEL!r}, max_concurrency=8)
        result = sweep(client, prompt=["a", "b", "c", "d"], temperature=[0.5, 1.0],
                       repeats=40, max_tokens=1, cache={str(cache)!r}, results={str(results)!r},
                       progress=False, probe=False)
        assert result.n_failed == 0
        print(result.usage["sent"])
        """
    )


@pytest.mark.slow  # a real server and four processes: about a minute
def test_four_processes_sharing_one_results_directory_keep_every_request_once(
    live_server: str, tmp_path: Path
) -> None:
    """The README's ``cache="study/", results="study/"`` started four times: each request id once
    in the dataset, no process dies renaming a part, and the requests are paid once."""
    study = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _sharing_script(live_server, study / "cache.sqlite", study, 0.5 * n),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
    assert sum(int(out.split()[-1]) for out, _ in outs) == 320  # each request paid once
    merged = load_sweep(study)
    assert merged.requests["request_id"].tolist() == list(range(320))
    assert merged.choices["request_id"].tolist() == list(range(320))
    assert not list(study.glob(".staging-*"))  # the other writers' parts moved in


@pytest.mark.slow
async def test_two_sweeps_at_once_on_one_results_directory_keep_every_request_once(
    app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quick twin of the four-process test: the second writer stages its parts and, once the
    first is done, replaces the dataset with its own complete copy."""
    import asyncio

    import nbcompletions.sweeps.dataset as dataset
    from nbcompletions import AsyncClient, asweep

    monkeypatch.setattr(dataset, "FLUSH_EVERY", 3)
    study = tmp_path / "study"
    staged: list[Path] = []

    async def one(delay: float) -> Any:
        await asyncio.sleep(delay)
        async with AsyncClient(
            "http://embedded/v1", model=MODEL, transport=StreamingASGITransport(app)
        ) as aclient:
            run = asweep(aclient, **GRID, cache=study / "cache.sqlite", results=study,
                         progress=False, probe=False)  # fmt: skip
            task = asyncio.ensure_future(run)
            while not task.done():
                staged.extend(study.glob(".staging-*"))
                await asyncio.sleep(0.01)
            return task.result()

    first, second = await asyncio.gather(one(0.0), one(0.05))
    assert staged  # one of them wrote aside
    assert first.usage["sent"] + second.usage["sent"] == 16  # 24 points, 16 distinct requests
    merged = load_sweep(study)
    assert merged.requests["request_id"].tolist() == list(range(24))
    assert merged.choices["request_id"].tolist() == list(range(24))
    assert not list(study.glob(".staging-*"))
    assert not list(study.glob("*/.*.tmp"))


def test_shards_are_disjoint_and_stable_when_repeats_are_added() -> None:
    client = Client("http://127.0.0.1:9/v1", model="m")
    small = expand_grid(client, ["a", "b", "a"], temperature=[0.1, 0.9], repeats=3)
    large = expand_grid(client, ["a", "b", "a"], temperature=[0.1, 0.9], repeats=7)

    def shards(grid: Any) -> dict[tuple[Any, int], int]:
        points = grid.points
        return {
            (points[i].key, points[i].repeat): points.shard_of(i, 4) for i in range(len(points))
        }

    small_shards, large_shards = shards(small), shards(large)
    assert all(large_shards[key] == shard for key, shard in small_shards.items())
    assert set(large_shards.values()) == {0, 1, 2, 3}
    # A point and the points that copy it (the prompt "a" listed twice) share a shard.
    points = large.points
    for i in range(len(points)):
        assert points.shard_of(i, 4) == points.shard_of(points.original(i), 4)


@pytest.mark.slow
def test_four_shards_merged_are_the_unsharded_run(app: Any, tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    client = Client("http://embedded/v1", model=MODEL, transport=StreamingASGITransport(app))
    with client:
        shards = [
            sweep(
                client,
                **GRID,
                cache=cache,
                results=tmp_path / f"shard-{i}",
                shard=(i, 4),
                progress=False,
                probe=False,
            )
            for i in range(4)
        ]
        whole = sweep(client, **GRID, cache=cache, progress=False, probe=False)
    assert sum(len(s) for s in shards) == len(whole) == 24
    assert whole.usage["sent"] == 0  # the shards together sent every request
    assert all(s.usage["shard"] == [i, 4] for i, s in enumerate(shards))
    merged = load_sweep(tmp_path / "shard-*")  # a glob, as a Path
    assert merged.requests["request_id"].tolist() == whole.requests["request_id"].tolist()
    assert merged.usage["requests"] == 24
    for name in ("choices", "tokens", "alternatives"):
        ours, theirs = getattr(merged, name), getattr(whole, name)
        assert ours["request_id"].tolist() == theirs["request_id"].tolist(), name
        assert ours["text" if name == "choices" else "logprob"].tolist() == (
            theirs["text" if name == "choices" else "logprob"].tolist()
        )
    # The merged study saves as one (the shards' parts merged a row group at a time).
    saved = load_sweep(merged.to_parquet(tmp_path / "merged"))
    assert saved.tokens["request_id"].tolist() == whole.tokens["request_id"].tolist()
    # Saved shards (SweepResult.to_parquet) merge too; overlapping ones are refused.
    shards[0].to_parquet(tmp_path / "saved-0")
    shards[1].to_parquet(tmp_path / "saved-1")
    two = load_sweep([tmp_path / "saved-0", tmp_path / "saved-1"])
    assert sorted(two.requests["request_id"]) == sorted(
        [*shards[0].requests["request_id"], *shards[1].requests["request_id"]]
    )
    with pytest.raises(ValueError, match="not shards of one sweep"):
        load_sweep([tmp_path / "saved-0", tmp_path / "shard-0"])


@pytest.mark.parametrize("bad", [(4, 4), (-1, 2), (0, 0), (1,), "0/4", (True, 2), (0.0, 2)])
def test_a_bad_shard_names_the_field(bad: Any) -> None:
    from nbcompletions import RequestError

    client = Client("http://127.0.0.1:9/v1", model="m")
    with pytest.raises(RequestError, match=r"shard must be \(index, count\)") as info:
        sweep(client, prompt="a", shard=bad, progress=False, probe=False)
    assert info.value.param == "shard"


def test_shards_as_ray_tasks(app: Any, tmp_path: Path) -> None:
    """The README's Ray example, on the embedded model (tasks in local mode)."""
    ray = pytest.importorskip("ray", reason="ray is optional: pip install ray to run this")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)

    def run_shard(i: int, k: int, out: str) -> int:
        from nbcompletions import Client, sweep

        with Client(embedded=True) as client:
            result = sweep(client, **GRID, results=f"{out}/shard-{i}", shard=(i, k), progress=False)
        return len(result)

    try:
        task = ray.remote(run_shard)
        sizes = ray.get([task.remote(i, 2, str(tmp_path)) for i in range(2)])
    finally:
        ray.shutdown()
    merged = load_sweep(str(tmp_path / "shard-*"))
    assert sum(sizes) == 24
    assert merged.requests["request_id"].tolist() == list(range(24))


@pytest.mark.slow
def test_without_pyarrow_parquet_results_name_the_extra(tmp_path: Path) -> None:
    """pyarrow is the ``parquet`` extra: sweeps in memory work without it, and what needs it
    says which extra to install."""
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "pyarrow" or name.startswith("pyarrow."):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import httpx
        from nbcompletions import Client, load_sweep, sweep

        def answer(request):
            return httpx.Response(200, json={{"choices": [{{"index": 0, "text": "hi"}}]}})

        client = Client("http://t/v1", model="m", transport=httpx.MockTransport(answer))
        result = sweep(client, prompt=["a", "b"], progress=False, probe=False)
        assert len(result.choices) == 2
        for attempt in (
            lambda: sweep(client, prompt="a", results={str(tmp_path / "r")!r}, progress=False,
                          probe=False),
            lambda: result.to_parquet({str(tmp_path / "saved")!r}),
            lambda: load_sweep({str(tmp_path)!r}),
        ):
            try:
                attempt()
            except ImportError as exc:
                assert "pip install 'nbcompletions[parquet]'" in str(exc), exc
            else:
                raise AssertionError("no ImportError")
        assert "pyarrow" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_batch_lines_without_usable_choices_are_error_rows_as_live(tmp_path: Path) -> None:
    """The Batch path ends in the same finish: a 200 line whose body is ``{"error": ...}``, ``{}``
    or ``{"choices": "x"}`` is an error row there too, not ok."""
    from nbcompletions import load_batch_output

    client = Client("http://127.0.0.1:9/v1", model="m")
    grid = expand_grid(client, ["a", "b", "c", "d", "a"], max_tokens=2)
    good = {"id": "x", "choices": [{"index": 0, "text": "hi"}], "usage": {"total_tokens": 3}}
    bodies = [
        good,
        {"error": {"message": "overloaded", "type": "server_error"}},
        {},
        {"choices": "x"},
    ]
    output = tmp_path / "output.jsonl"
    with output.open("w") as handle:
        for point, body in zip(grid.points, bodies, strict=False):
            line = {"custom_id": point.key, "response": {"status_code": 200, "body": body}}
            handle.write(json.dumps({**line, "error": None}) + "\n")
    result = load_batch_output(grid, output)
    assert result.requests["status"].tolist() == ["ok", "error", "error", "error", "ok"]
    # The error body's own type where it has one ({"error": {"type": "server_error"}}).
    assert result.requests["error_type"].tolist()[1:4] == [
        "server_error",
        "invalid_response",
        "invalid_response",
    ]
    assert "overloaded" in result.requests["error_message"][1]
    assert result.usage["failed_requests"] == 3
    assert result.usage["total_tokens"] == 3


def test_numpy_integers_are_integers_for_shard_and_repeats() -> None:
    import numpy as np

    from nbcompletions.sweeps.plan import check_shard

    assert check_shard((np.int64(1), np.int64(4))) == (1, 4)
    client = Client("http://127.0.0.1:9/v1", model="m")
    assert len(expand_grid(client, "a", repeats=np.int64(3)).points) == 3
