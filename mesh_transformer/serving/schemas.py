"""What the HTTP API accepts: the bodies of POST /v1/completions, /v1/chat/completions and /complete as
pydantic models built for one served model, so that every constraint validation enforces that can be
written in JSON Schema - ranges, lengths, the model's name, its context and vocabulary - is in them and in
/openapi.json; and the error a refused request gets.

What a schema cannot say (a prompt's tokens plus max_tokens within the context, logprobs with n) is
checked in `inputs` and answered 400 the same way.
"""

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mesh_transformer.sampling import MAX_LOGPROBS

MAX_STOP_SEQUENCES = 4
MAX_ROWS_PER_REQUEST = 64  # prompts x n
STRICT = ConfigDict(strict=True, extra="ignore")  # no coercion ("10" is not 10); unknown fields ignored


class ApiError(Exception):
    """Answered as an OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.headers = {"Retry-After": "1"} if status == 503 else None


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: None


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request may ask of the served model."""

    model_name: str
    context: int  # tokens of prompt + completion
    vocab_size: int  # token ids are below it


@dataclasses.dataclass(frozen=True)
class Schemas:
    completion: type[BaseModel]
    chat: type[BaseModel]
    complete: type[BaseModel]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None


def request_schemas(limits: Limits) -> Schemas:
    """The request models of a server for a model with these limits."""
    Text = Annotated[str, Field(min_length=1)]
    TokenId = Annotated[int, Field(ge=0, lt=limits.vocab_size)]
    MaxTokens = Annotated[int, Field(ge=0, le=limits.context - 1)] | None
    Probability = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]
    Stop = Text | Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)] | None

    class Sampling(BaseModel):
        """Fields both OpenAI endpoints share."""

        model_config = STRICT
        model: Literal[limits.model_name] | None = None  # type: ignore[valid-type]
        max_tokens: MaxTokens = Field(default=None, description="default 16 (completions), the rest (chat)")
        temperature: Temperature | None = 1.0
        top_p: Probability | None = 1.0
        top_k: Annotated[int, Field(ge=0)] | None = Field(default=0, description="an extension; 0 = off")
        stop: Stop = None
        n: Annotated[int, Field(ge=1, le=MAX_ROWS_PER_REQUEST)] | None = 1
        seed: int | None = None
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        user: str | None = None

    class CompletionRequest(Sampling):
        """POST /v1/completions. prompts x n is at most 64; a prompt's tokens plus max_tokens fit the
        context."""

        prompt: (
            Text
            | Annotated[list[Text], Field(min_length=1, max_length=MAX_ROWS_PER_REQUEST)]
            | Annotated[list[TokenId], Field(min_length=1, max_length=limits.context)]
            | Annotated[
                list[Annotated[list[TokenId], Field(min_length=1, max_length=limits.context)]],
                Field(min_length=1, max_length=MAX_ROWS_PER_REQUEST),
            ]
        )
        logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
        echo: bool | None = False
        suffix: None = Field(default=None, description="not supported")

    class ChatRequest(Sampling):
        """POST /v1/chat/completions, rendered with the server's chat template."""

        messages: Annotated[list[Message], Field(min_length=1)]
        max_completion_tokens: MaxTokens = None
        logprobs: bool | None = False
        top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    class CompleteRequest(BaseModel):
        """POST /complete, the original trainer's: 256 new tokens or what the context leaves."""

        model_config = STRICT
        context: Text
        top_p: Probability = 0.9
        temp: Temperature = 1.0
        max_tokens: Annotated[int, Field(ge=1, le=limits.context - 1)] | None = None

    return Schemas(CompletionRequest, ChatRequest, CompleteRequest)


def text_of(content: Any) -> str:
    """A chat message's content as one string (text parts joined)."""
    return content if isinstance(content, str) else "".join(part.text for part in content)
