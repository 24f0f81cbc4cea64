"""The OpenAI-compatible gateway behind `sage llm serve`.

Modules: config (options), registry (engine table from the state file), routing
(strategies), health (active and passive checks), proxy (the hot path), auth,
metrics, management (engine lifecycle over HTTP), scheduling (the seam for
admission control), app (ASGI assembly), server (uvicorn), daemon (background
mode and the gateway's state-file record).
"""
