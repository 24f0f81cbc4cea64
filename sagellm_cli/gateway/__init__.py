"""The OpenAI-compatible gateway behind `sage llm serve`.

Modules: config (options), registry (engine table from the state file), routing
(strategies), health (active and passive checks), proxy (the hot path), request
(priority, deadline and gateway body fields of a request), auth, metrics,
management (engine lifecycle over HTTP), scheduling (admission control and queues),
policies, estimator and adaptive (its policy rules, service-time estimate and
policy switcher), app (ASGI assembly), server (uvicorn), daemon (background mode
and the gateway's state-file record).
"""
