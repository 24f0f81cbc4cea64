"""The OpenAI-compatible gateway behind `sage llm serve`.

Modules: config (options), registry (engine table from the state file), routing
(strategies), health (active and passive checks), proxy (the hot path), request
(priority, deadline and gateway body fields of a request), auth, metrics,
management (engine lifecycle over HTTP), scheduling (admission control and queues),
policies, estimator and adaptive (its policy rules, service-time estimate and
policy switcher), stats (sliding-window aggregates for /v1/management/metrics),
supervisor (restart policies, hung-engine probes, idle unload, wake on request), loops
(the background loops' shared shape), app (ASGI assembly), server (uvicorn), embedded
(the same server in a thread, for the library), daemon (background mode and the
gateway's state-file record).
"""
