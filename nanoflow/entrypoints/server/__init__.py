"""OpenAI-compatible HTTP server (`nanoflow serve`). Server-only dependencies (fastapi, uvicorn,
pydantic, prometheus_client) are imported only inside this package."""
