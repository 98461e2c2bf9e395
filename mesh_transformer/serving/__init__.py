"""An OpenAI-compatible HTTP server over a continuous-batching `engine.Engine`: /v1/completions (logprobs,
echo, streaming), /v1/chat/completions (the tokenizer's chat template), /v1/models, /health, the original
trainer's /complete, and /openapi.json.

schemas.py   what a request may hold (pydantic models whose constraints /openapi.json publishes)
inputs.py    a validated body to engine rows: settings, prompts tokenized, chat messages rendered
chat.py      chat templates: where they are found and how they are rendered (as transformers does)
worker.py    the thread that drives the engine, and how a request's rows report back to its handler
responses.py OpenAI-shaped bodies and stream events: choices, logprobs, usage
app.py       the FastAPI app: routes, authentication, body limit, error handling
"""

from mesh_transformer.serving.app import ServerOptions, build_app, serve

__all__ = ["ServerOptions", "build_app", "serve"]
