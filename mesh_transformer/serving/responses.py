"""OpenAI-shaped answers: the bodies of /v1/completions and /v1/chat/completions, their server-sent-event
chunks, and usage. Log-probabilities take OpenAI's layouts: for completions `tokens`, `token_logprobs`,
`top_logprobs` (the alternatives and the chosen token, by text) and `text_offset` (into the choice's text),
with echo the prompt's first (its first token has none); for chat, `content` entries of token, logprob,
bytes and top_logprobs.

A streamed choice gets its text as it grows (with echo, the prompt's first) and all its log-probabilities
with its last chunk.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Any

from tokenizers.decoders import DecodeStream

from mesh_transformer.sampling import Completion, TokenLogprob
from mesh_transformer.serving.inputs import Prepared


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes byte b as one character: itself where printable, else chr(256 + k)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}


UNICODE_TO_BYTE = _byte_level_alphabet()


def usage(prepared: Prepared, completions: list[Completion]) -> dict:
    """Tokens of each prompt once (however many choices it has) and of every choice's completion."""
    prompt_tokens = sum(len(ids) for ids in prepared.prompts)
    completion_tokens = sum(c.generated_tokens for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenText:
    """The text of single tokens (special tokens included), and where tokens start in their decoded text.

    A token that is part of a UTF-8 character is written as its bytes, "bytes:\\xe2\\x9c", as OpenAI does,
    where the tokenizer is byte-level (GPT-2's); elsewhere as its vocabulary entry. Either way distinct
    tokens keep distinct texts, so that no alternative hides another in `top_logprobs`."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        self._byte_level = decoder.get("type") == "ByteLevel"

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - one per server, as long-lived as it
    def __call__(self, token: int) -> str:
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text
        piece = self.tokenizer.id_to_token(token) or text
        if self._byte_level and all(c in UNICODE_TO_BYTE for c in piece):
            return "bytes:" + "".join(f"\\x{UNICODE_TO_BYTE[c]:02x}" for c in piece)
        return piece

    def offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """The character offset of each token in `decode(ids)` (a token that completes a character split
        over several starts after the earlier ones), counted from `start`."""
        stream, offsets, at = DecodeStream(skip_special_tokens=True), [], start
        for token in ids:
            offsets.append(at)
            at += len(stream.step(self.tokenizer, token) or "")
        return offsets


class _Format:
    """What both endpoints share: the response head and the order of choices."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, tokens: TokenText, prepared: Prepared, model_name: str):
        self.tokens, self.prepared = tokens, prepared
        self.head = {
            "id": f"{self.id_prefix}{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model_name,
        }

    def body(self, completions: list[Completion]) -> dict:
        choices = [self.choice(k, c) for k, c in enumerate(completions)]
        return {
            **self.head,
            "object": self.object_name,
            "choices": choices,
            "usage": usage(self.prepared, completions),
        }

    def chunk(self, choices: list[dict], **extra: Any) -> dict:
        return {**self.head, "object": self.chunk_name, "choices": choices, **extra}

    def usage_chunk(self, completions: list[Completion]) -> dict:
        return self.chunk([], usage=usage(self.prepared, completions))

    def prompt_of(self, k: int) -> int:
        return k // self.prepared.n

    def choice(self, k: int, completion: Completion) -> dict:
        raise NotImplementedError

    def start_chunks(self) -> list[dict]:
        return []


class CompletionFormat(_Format):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl-"

    def choice(self, k: int, completion: Completion) -> dict:
        text, logprobs = completion.text, self._logprobs(completion.logprobs, 0)
        if self.prepared.echo:
            prompt_text, prompt_logprobs = self._prompt(k, completion)
            text = prompt_text + text
            if logprobs is not None:
                completion_part = self._logprobs(completion.logprobs, len(prompt_text))
                logprobs = {key: prompt_logprobs[key] + completion_part[key] for key in prompt_logprobs}
        return {"text": text, "index": k, "logprobs": logprobs, "finish_reason": completion.finish_reason}

    def start_chunks(self) -> list[dict]:
        """With echo, each choice's prompt (its log-probabilities come with the choice's last chunk)."""
        if not self.prepared.echo:
            return []
        return [
            self.chunk([self._piece(k, self.prepared.prompt_texts[self.prompt_of(k)])])
            for k in range(len(self.prepared.rows))
        ]

    def text_chunk(self, k: int, delta: str) -> dict:
        return self.chunk([self._piece(k, delta)])

    def done_chunk(self, k: int, completion: Completion) -> dict:
        logprobs = self.choice(k, completion)["logprobs"]
        return self.chunk(
            [{"text": "", "index": k, "logprobs": logprobs, "finish_reason": completion.finish_reason}]
        )

    @staticmethod
    def _piece(k: int, text: str) -> dict:
        return {"text": text, "index": k, "logprobs": None, "finish_reason": None}

    def _prompt(self, k: int, completion: Completion) -> tuple[str, dict | None]:
        i = self.prompt_of(k)
        text = self.prepared.prompt_texts[i]
        entries = completion.prompt_logprobs
        if entries is None:
            return text, None
        ids = self.prepared.prompts[i]
        return text, self._layout(ids, entries, self.tokens.offsets(ids))

    def _logprobs(self, entries: list[TokenLogprob] | None, start: int) -> dict | None:
        if entries is None:
            return None
        ids = [e.token for e in entries]
        return self._layout(ids, entries, self.tokens.offsets(ids, start))

    def _layout(self, ids: list[int], entries: list[TokenLogprob | None], offsets: list[int]) -> dict:
        return {
            "tokens": [self.tokens(t) for t in ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else self._top(e) for e in entries],
            "text_offset": offsets,
        }

    def _top(self, entry: TokenLogprob) -> dict[str, float]:
        top = {self.tokens(t): lp for t, lp in entry.top}
        top.setdefault(self.tokens(entry.token), entry.logprob)
        return top


class ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def choice(self, k: int, completion: Completion) -> dict:
        return {
            "index": k,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": self._logprobs(completion),
            "finish_reason": completion.finish_reason,
        }

    def start_chunks(self) -> list[dict]:
        return [self._delta(k, {"role": "assistant", "content": ""}) for k in range(len(self.prepared.rows))]

    def text_chunk(self, k: int, delta: str) -> dict:
        return self._delta(k, {"content": delta})

    def done_chunk(self, k: int, completion: Completion) -> dict:
        return self._delta(k, {}, completion.finish_reason, self._logprobs(completion))

    def _delta(self, k: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return self.chunk([{"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def _logprobs(self, completion: Completion) -> dict | None:
        if completion.logprobs is None:
            return None
        return {"content": [self._entry(e.token, e.logprob, e.top) for e in completion.logprobs]}

    def _entry(self, token: int, logprob: float, top: list[tuple[int, float]] | None = None) -> dict:
        text = self.tokens(token)
        entry = {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}
        if top is not None:
            entry["top_logprobs"] = [self._entry(t, lp) for t, lp in top]
        return entry
