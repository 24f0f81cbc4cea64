"""Operations on engines: start, stop, restart and reconcile (EngineManager), restart policies, the model scheduler, external engines, LoRA, logs, readiness probes and the monitor."""
