"""OpenAI wire format: pydantic request/response models and the mapping to SamplingParams.

Request models are strict (no "0.5" for a float, no true for an int). Unknown fields are ignored
as vLLM does (clients such as LangChain and LiteLLM send extras); the endpoints log their names
(`ignored_fields`). nanoflow's extra sampling knobs
(top_k, min_p, repetition_penalty, ignore_eos, ...) are declared fields, so the openai client
sends them through `extra_body`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from nanoflow.sampling_params import SamplingParams

# torch.Generator.manual_seed takes a signed or unsigned 64-bit seed; the engine seeds sample i
# with seed + i, so the range stays signed 64-bit like vLLM's.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1
# n sequences are built eagerly per request: a bound keeps one request from flooding the engine.
MAX_N = 128
MAX_STOP = 64
_TOP_K_MAX = 2**31 - 1  # the sampler puts top_k in an int64 tensor
# Fields of features nanoflow does not have (vLLM's or OpenAI's names): ignoring them like other unknown
# fields would silently answer without the feature, so each is a 400 that names the feature.
UNSUPPORTED_FIELDS = {
    "guided_json": "structured output", "guided_regex": "structured output", "guided_choice": "structured output",
    "guided_grammar": "structured output", "structured_outputs": "structured output",
    "functions": "tool calling", "function_call": "tool calling", "prompt_logprobs": "prompt logprobs",
}


class OpenAIError(Exception):
    """A client mistake with its OpenAI error fields; the app turns it into a 4xx response."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class TolerantModel(BaseModel):
    """Request objects: strict types; unknown fields are kept aside (model_extra) and then ignored."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    def ignored_fields(self) -> list[str]:
        """The unknown field names, nested ones as parent.child (messages[].name for a message)."""
        names = [n for n in self.model_extra or {} if n not in UNSUPPORTED_FIELDS]
        for field in type(self).model_fields:
            value = getattr(self, field)
            if isinstance(value, TolerantModel):
                names += [f"{field}.{n}" for n in value.ignored_fields()]
            # A validated list holds one type (messages, or a prompt's token ids): its first item says
            # whether to look inside, so a long prompt of token ids is not walked id by id.
            elif isinstance(value, list) and value and isinstance(value[0], TolerantModel):
                for item in value:
                    names += [f"{field}[].{n}" for n in item.ignored_fields()]
        return list(dict.fromkeys(names))


class _Lenient(BaseModel):
    """Response models: no validation beyond construction."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(TolerantModel):
    include_usage: bool = False


class _SamplingFields(TolerantModel):
    """Fields shared by completions and chat, including the vLLM-style extras."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    # Stop strings are checked after every token: at most MAX_STOP (_check_common) keeps one request
    # from slowing the batch; checked there, not here, so the error says the limit in plain words.
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extras (vLLM names).
    top_k: int | None = Field(None, ge=-1, le=_TOP_K_MAX)
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: Annotated[list[int], Field(max_length=1024)] | None = None
    skip_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _check_common(self, vocab_size: int) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED_FIELDS and value is not None:
                raise OpenAIError(f"{UNSUPPORTED_FIELDS[name]} is not supported by nanoflow (field '{name}')",
                                  param=name)
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise OpenAIError(f"at most {MAX_STOP} stop strings are allowed, got {len(self.stop)}", param="stop")
        if self.logit_bias:
            raise OpenAIError("logit_bias is not supported", param="logit_bias")
        # The sampler indexes the logits with these ids: out-of-vocab ids must never reach it.
        for t in self.stop_token_ids or []:
            if not 0 <= t < vocab_size:
                raise OpenAIError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {t}",
                                  param="stop_token_ids")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, renames: dict[str, str],
                         defaults: Mapping[str, Any]) -> SamplingParams:
        """defaults: --generation-config's values for the fields this request leaves unset."""
        kwargs: dict[str, Any] = dict(
            n=self.n, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )
        # None means "OpenAI's default", which is SamplingParams' default for each of these.
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name)
            if value is not None:
                kwargs[name] = value
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            # SamplingParams names the parameter first; report it under the request's field name.
            name = str(e).split(" ", 1)[0]
            raise OpenAIError(str(e), param=renames.get(name, name)) from e


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def prompts(self) -> list[str | list[int]]:
        """The prompt batch: one string, one token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise OpenAIError("prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self, vocab_size: int, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        defaults = defaults or {}
        self._check_common(vocab_size)
        if self.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError("best_of is not supported (only best_of == n)", param="best_of")
        if self.echo and self.logprobs is not None:
            raise OpenAIError("echo with logprobs is not supported (prompt logprobs are not computed)",
                              param="echo")
        # OpenAI's 16 applies only when neither the request nor the generation config gives a limit.
        max_tokens = self.max_tokens if "max_tokens" in self.model_fields_set else defaults.get("max_tokens", 16)
        return self._sampling_params(max_tokens, self.logprobs, {}, defaults)


class TextContentPart(TolerantModel):
    type: Literal["text"]
    text: str


class ChatMessage(TolerantModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def to_template(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        msg: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # Extras.
    add_generation_prompt: bool = True

    def to_sampling_params(self, vocab_size: int, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        defaults = defaults or {}
        self._check_common(vocab_size)
        if self.tools:
            raise OpenAIError("tool calling is not supported by nanoflow (tools)", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise OpenAIError("tool calling is not supported by nanoflow (tool_choice)", param="tool_choice")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise OpenAIError(f"structured output is not supported by nanoflow (response_format type "
                              f"{self.response_format.get('type')!r}); only {{\"type\": \"text\"}}",
                              param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is None:
            max_tokens = defaults.get("max_tokens")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        renames = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        return self._sampling_params(max_tokens, logprobs, renames, defaults)


class TokenizeRequest(TolerantModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(TolerantModel):
    model: str | None = None
    tokens: list[int]


# --- responses ------------------------------------------------------------------------------------
class UsageInfo(_Lenient):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Lenient):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Lenient):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Lenient):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Lenient):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Lenient):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(_Lenient):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Lenient):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Lenient):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(_Lenient):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI deltas carry only what changed: {"content": "..."}, not {"role": null, ...}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Lenient):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Lenient):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(_Lenient):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nanoflow"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Lenient):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(_Lenient):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Lenient):
    prompt: str


class ErrorInfo(_Lenient):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Lenient):
    error: ErrorInfo
