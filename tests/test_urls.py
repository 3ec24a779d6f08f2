"""URLs given by the user (bridge/urls.py): whatever else is wrong, a secret never shows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.urls import check_endpoint_url, parse_broker_url, redact_url

SECRET = "pa55-W0RD-SECRET"
noise = st.lists(st.sampled_from([*"hx:09[]/?#@.% \n\t", "99999", "::1"]), max_size=10).map("".join)


@given(
    scheme=st.sampled_from(["mqtt://", "mqtts://", "http://", "https://", "", "mqtt:", "//"]),
    user=st.sampled_from(["", "u", "u/x", "u@x"]),
    secret=st.sampled_from([SECRET, f"a/{SECRET}", f"{SECRET}@x", f"{SECRET}?q"]),
    rest=noise,
)
def test_no_error_shows_the_password(scheme: str, user: str, secret: str, rest: str) -> None:
    url = f"{scheme}{user}:{secret}@{rest}"
    assert SECRET not in redact_url(url)
    for check in (parse_broker_url, check_endpoint_url):
        with pytest.raises(ValueError, match=r".") as caught:
            check(url)
        assert SECRET not in str(caught.value)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("mqtt://broker", "broker", 1883),
        ("mqtts://broker", "broker", 8883),
        ("mqtts://broker:443/", "broker", 443),
        ("mqtt://[::1]:1884", "::1", 1884),
    ],
)
def test_valid_broker_urls(url: str, host: str, port: int) -> None:
    parsed = parse_broker_url(url)
    assert (parsed.host, parsed.port) == (host, port)
