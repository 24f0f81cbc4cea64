"""`sage llm bench`: a load generator for OpenAI-compatible endpoints.

- `workload`: what to send (synthetic prompts, datasets, priority/SLO mix);
- `load`: when to send it (closed loop, open-loop Poisson) and how it is timed;
- `metrics`: per-request records and their summary;
- `report`, `compare`: tables, JSON and plots.

Nothing here imports vllm, torch or transformers; matplotlib and tokenizers
are imported lazily, only when asked for.
"""
