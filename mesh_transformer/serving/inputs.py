"""From a validated request body to the rows an engine generates: sampling settings, prompts tokenized
(after their length in characters is checked against what the context could hold), chat messages rendered
with the chat template, and every row checked by the generator. Runs on a worker thread, never on the
event loop: tokenizing a long prompt takes a while.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from mesh_transformer.engine import Generator
from mesh_transformer.sampling import Row, SamplingError, SamplingParams
from mesh_transformer.serving.chat import ChatTemplate, ChatTemplateError
from mesh_transformer.serving.schemas import MAX_ROWS_PER_REQUEST, ApiError, text_of

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default


@dataclasses.dataclass
class Prepared:
    """A request as rows: prompt i's choice j is row i * n + j (OpenAI's order of choices)."""

    rows: list[Row]
    prompts: list[list[int]]  # token ids of each prompt
    prompt_texts: list[str]  # each prompt's text (what echo returns)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # alternatives reported per token; None: no log-probabilities


class Preparer:
    """Turns request bodies into `Prepared` rows for `generator`."""

    def __init__(self, generator: Generator, chat_template: ChatTemplate | None, complete_max_tokens: int):
        self.generator, self.chat_template = generator, chat_template
        self.tokenizer, self.context = generator.tokenizer, generator.seq
        self.complete_max_tokens = complete_max_tokens
        # No token is longer than this many characters, so a longer text cannot fit the context.
        pieces = self.tokenizer.decode_batch([[i] for i in range(generator.vocab_size)])
        self.max_chars = self.context * (max(map(len, pieces), default=1) + 1)

    def completion(self, body: Any) -> Prepared:
        prompts = body.prompt
        if isinstance(prompts, str) or isinstance(prompts[0], int):
            prompts = [prompts]
        n = body.n or 1
        if len(prompts) * n > MAX_ROWS_PER_REQUEST:
            raise ApiError(f"prompts x n is {len(prompts) * n}; at most {MAX_ROWS_PER_REQUEST}", "n")
        settings = self._settings(body, body.max_tokens, body.logprobs, prompt_logprobs=bool(body.echo))
        ids = [self._encode(p, "prompt") if isinstance(p, str) else list(p) for p in prompts]
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        prepared = Prepared([], ids, texts, n, bool(body.stream), _include_usage(body), bool(body.echo))
        prepared.logprobs = body.logprobs
        return self._rows(prepared, settings)

    def chat(self, body: Any) -> Prepared:
        if self.chat_template is None:
            raise ApiError(
                "this server has no chat template: start it with --chat-template FILE, or put "
                "chat_template in the tokenizer_config.json beside the tokenizer",
                "messages",
            )
        messages = [{"role": m.role, "content": text_of(m.content)} for m in body.messages]
        for message, given in zip(messages, body.messages, strict=True):
            if given.name is not None:
                message["name"] = given.name
        if sum(len(m["content"]) for m in messages) > self.max_chars:
            raise ApiError(
                f"messages are too long for the model's context of {self.context} tokens", "messages"
            )
        try:
            text = self.chat_template.render(messages)
        except ChatTemplateError as e:
            raise ApiError(str(e), "messages") from None
        ids = self._encode(text, "messages", add_special_tokens=False)
        alternatives = (body.top_logprobs or 0) if body.logprobs else None
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = asked if asked is not None else max(0, self.context - len(ids))
        settings = self._settings(body, max_tokens, alternatives, prompt_logprobs=False)
        prepared = Prepared([], [ids], [text], body.n or 1, bool(body.stream), _include_usage(body))
        prepared.logprobs = alternatives
        return self._rows(prepared, settings)

    def complete(self, body: Any) -> Prepared:
        """The original /complete: `complete_max_tokens` new tokens, or what the context leaves."""
        ids = self._encode(body.context, "context")
        room = self.context - len(ids)
        if room < 1:
            raise ApiError(f"context must be 1 to {self.context - 1} tokens, got {len(ids)}", "context")
        wanted = body.max_tokens or self.complete_max_tokens
        settings = SamplingParams(
            max_tokens=min(wanted, room), temperature=body.temp, top_p=body.top_p, seed=secrets.randbits(63)
        )
        return self._rows(Prepared([], [ids], [body.context]), settings)

    def _settings(self, body: Any, max_tokens: int | None, logprobs: int | None, prompt_logprobs: bool):
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        for s in stop:
            self._encode(s, "stop")  # text the tokenizer cannot encode can never be generated
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or 0,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=tuple(stop),
            seed=body.seed if body.seed is not None else secrets.randbits(63),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs and logprobs is not None,
        )

    def _encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > self.max_chars:  # spare the tokenizer
            raise ApiError(f"{param} is too long for the model's context of {self.context} tokens", param)
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception:  # e.g. lone UTF-16 surrogates that JSON allows but UTF-8 cannot encode
            raise ApiError(f"{param} is not encodable text", param) from None

    def _rows(self, prepared: Prepared, settings: SamplingParams) -> Prepared:
        for i, ids in enumerate(prepared.prompts):
            for j in range(prepared.n):
                row = Row(ids, settings, choice=i * prepared.n + j)
                try:
                    self.generator.check(row)
                except SamplingError as e:
                    raise ApiError(str(e), "prompt" if "prompt" in str(e) else None) from None
                prepared.rows.append(row)
        return prepared


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
