"""pytest fixtures shared by the client tests (see tollgate_env.py)."""

import pytest

from tollgate_env import Control


@pytest.fixture(autouse=True)
def clean_slate(monkeypatch):
    """Every test starts with the fake's default behaviour and without the
    variables the Ollama clients read on their own."""
    for name in ("OLLAMA_API_KEY", "OLLAMA_HOST", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    Control().reset()
    yield


@pytest.fixture
def control():
    return Control()
