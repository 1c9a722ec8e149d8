"""The server tests need the [serve] extra and the clients of the [test] extra; without them they skip, visibly."""

import pytest

for module in ("starlette", "uvicorn", "prometheus_client", "pydantic", "openai", "httpx"):
    pytest.importorskip(module, reason=f"the server tests need {module} (pip install -e '.[test]')")
