"""An OpenAI-compatible server: `python -m gpt2.serve checkpoint=<run>` (or `gpt2-serve`).

- `gpt2.serve.scheduler`: `Scheduler`, continuous batching of every request in flight on one model.
- `gpt2.serve.api`: the FastAPI app (`/v1/completions`, `/v1/models`, `/health`, the playground at `/`).
- `gpt2.serve.cli`: the command (`run`, `main`): config, socket, uvicorn, graceful shutdown.
"""
