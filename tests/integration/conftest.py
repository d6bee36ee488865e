"""Fixtures of the integration modules; each module has its own ``server``."""

import httpx
import pytest


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the module's ``server``."""
    with httpx.Client(base_url=server.base_url, timeout=300) as c:
        yield c
