"""Acting on engines from inside the gateway: the management API and the supervisor."""
