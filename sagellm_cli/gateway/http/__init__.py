"""The gateway on the wire: ASGI app, uvicorn server and connection limits, auth, error bodies, the endpoint table, the proxy's hot path and the upstream client."""
