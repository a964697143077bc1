"""A study's endpoint manifest, and the drift check that compares a rerun's endpoint with it."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbcompletions as nbc
from nbcompletions._manifest import (
    FINGERPRINT_PROMPTS,
    drift,
    load_manifest,
    manifest_path,
    save_manifest,
    sweep_manifest,
)
from nbcompletions.server import StreamingASGITransport, create_app


@pytest.fixture(scope="module")
def manifest(embedded_client: nbc.Client) -> dict[str, Any]:
    return nbc.endpoint_manifest(embedded_client)


@pytest.fixture(scope="module")
def tiny_client(tiny_model_dir: Path) -> Iterator[nbc.Client]:
    """Another model (its own tokenizer) answering under the same base URL as the embedded one."""
    from nbcompletions.model import load_engine

    app = create_app(load_engine(tiny_model_dir))
    client = nbc.Client("http://embedded/v1", transport=StreamingASGITransport(app))
    yield client
    client.close()


def test_manifest_records_the_endpoint(manifest: dict[str, Any]) -> None:
    assert manifest["endpoint"] == "http://embedded/v1"
    assert manifest["model"] == "nbc-shakespeare"
    assert manifest["system_fingerprint"]  # our server sends one, as OpenAI and vLLM do
    assert manifest["model_card"]["id"] == "nbc-shakespeare"
    assert "created" not in manifest["model_card"]  # when the process started: not an identity
    assert len(manifest["tokenizer_hash"]) == 64
    assert manifest["conformance"]["ok"] is True
    assert manifest["conformance"]["vocab_size"] == 4096
    prompts = [f["prompt"] for f in manifest["fingerprints"]]
    assert prompts == list(FINGERPRINT_PROMPTS)
    for fingerprint in manifest["fingerprints"]:
        assert fingerprint["text"]
        assert len(fingerprint["tokens"]) == 8
        assert fingerprint["sum_logprob"] < 0
    json.dumps(manifest)  # stored as JSON beside a cache


def test_the_same_endpoint_has_not_drifted(
    embedded_client: nbc.Client, manifest: dict[str, Any]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nbc.check_drift(embedded_client, manifest) == []


def test_another_model_behind_the_same_url_is_drift(
    tiny_client: nbc.Client, manifest: dict[str, Any]
) -> None:
    with pytest.warns(nbc.DriftWarning, match="has changed since") as caught:
        changes = nbc.check_drift(tiny_client, manifest)
    message = str(caught[0].message)
    assert "tokenizer_hash was" in message
    assert "model_card was" in message
    assert any("greedy completion of 'To be, or not to be'" in c for c in changes)


def test_drift_names_what_changed(manifest: dict[str, Any]) -> None:
    moved = json.loads(json.dumps(manifest))
    moved["fingerprints"][0]["sum_logprob"] += 0.5
    moved["system_fingerprint"] = "fp_new"
    changes = drift(manifest, moved)
    assert len(changes) == 2
    assert changes[0].startswith("system_fingerprint was")
    assert "more than 0.05 nats apart" in changes[1]
    assert drift(manifest, moved, tolerance=1.0) == [changes[0]]


def test_a_sweep_records_then_checks(
    embedded_client: nbc.Client, tiny_client: nbc.Client, tmp_path: Path
) -> None:
    cache = tmp_path / "study.sqlite"
    assert manifest_path(cache) == tmp_path / "study.manifest.json"
    assert manifest_path(tmp_path) == tmp_path / "manifest.json"
    first = sweep_manifest(embedded_client, cache)
    assert load_manifest(manifest_path(cache)) == first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sweep_manifest(embedded_client, cache) == first  # read back and checked: no drift
    with pytest.warns(nbc.DriftWarning):
        sweep_manifest(tiny_client, cache)


def test_bad_manifests_are_refused(tmp_path: Path, manifest: dict[str, Any]) -> None:
    path = tmp_path / "m.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a manifest"):
        load_manifest(path)
    with pytest.raises(ValueError, match="made by endpoint_manifest"):
        save_manifest({"version": 1}, path)
    with pytest.raises(ValueError, match="manifest version must be 1; got 9"):
        save_manifest({**manifest, "version": 9}, path)


def test_sweep_keeps_the_manifest_beside_its_cache_and_warns_on_drift(
    embedded_client: nbc.Client, tiny_client: nbc.Client, tmp_path: Path
) -> None:
    """nbc.sweep itself records the manifest on the first run and checks it on every later one."""
    cache = tmp_path / "study.sqlite"
    fields: dict[str, Any] = {"max_tokens": 2, "temperature": 0, "progress": False}
    nbc.sweep(embedded_client, "To be", cache=cache, **fields)
    recorded = load_manifest(manifest_path(cache))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbc.sweep(embedded_client, "To be", cache=cache, **fields)  # the same endpoint: quiet
    assert load_manifest(manifest_path(cache)) == recorded
    with pytest.warns(nbc.DriftWarning, match="has changed since"):
        nbc.sweep(tiny_client, "To be", cache=cache, **fields)
    nbc.sweep(embedded_client, "To be", cache=tmp_path / "other.sqlite", manifest=False, **fields)
    assert not manifest_path(tmp_path / "other.sqlite").exists()
    results = tmp_path / "results"
    nbc.sweep(embedded_client, "To be", results=results, **fields)
    assert (results / "manifest.json").exists()
