"""Which engine a request goes to: the engine table, backends, routing strategies and health checks."""
