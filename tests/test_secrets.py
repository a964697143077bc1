"""API keys that HTTP cannot carry are refused up front, without showing the key."""

from __future__ import annotations

import pytest

from nbcompletions import AsyncClient, Client, RequestError
from nbcompletions._secrets import check_api_key

BAD_KEYS = ["sk-caf\u00e9-secret", "sk-\u4e2d\u6587-secret", "sk-tab\tsecret", "sk-line\nbreak"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_check_api_key_refuses_what_a_header_cannot_carry(key: str) -> None:
    with pytest.raises(RequestError) as info:
        check_api_key(key)
    error = info.value
    assert error.param == "api_key"
    assert "ASCII" in str(error)
    assert "secret" not in str(error)
    assert "secret" not in repr(error)
    assert error.value is None  # the key is not kept on the exception either


def test_check_api_key_accepts_printable_ascii() -> None:
    check_api_key("sk-proj-AbC_123.~!")


@pytest.mark.parametrize("make", [Client, AsyncClient])
@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_client_with_a_non_ascii_key_is_refused_at_construction(make: type, key: str) -> None:
    # Before: the constructor accepted it, and every call raised UnicodeEncodeError quoting it.
    with pytest.raises(RequestError) as info:
        make(base_url="http://127.0.0.1:9/v1", api_key=key)
    assert info.value.param == "api_key"
    assert "secret" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
