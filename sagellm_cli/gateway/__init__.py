"""The OpenAI-compatible gateway behind `sage llm serve`.

Here: config (options), daemon (background mode and the gateway's state-file record),
embedded (the same server in a thread, for the library), loops (the background loops'
shared shape). Packages: http (app, server, transport limits, auth, errors, endpoints,
request fields, the proxy's hot path, the upstream client), routing (engine table,
backends, strategies, health checks), admission (scheduler, policies, adaptive switcher,
estimator), control (management API, supervisor), telemetry (metrics, stats).
README.md, "Where things live", has the full table.
"""
