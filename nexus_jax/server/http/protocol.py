"""Request bodies of the OpenAI API (with vLLM's extra fields) and their SamplingParams.

Unknown fields are refused (400 naming them), as OpenAI does. Structured output comes as OpenAI's response_format
or vLLM's structured_outputs / guided_json, guided_regex, guided_choice, guided_grammar (one of them per request).
Fields of features the engine does not have yet (tools, echo, suffix, best_of) are refused with a 400 naming the
field when they ask for anything other than their neutral value, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.structured_outputs import StructuredOutputsParams
from nexus_jax.server.http.errors import bad_request, field_of


class _Body(BaseModel):
    # strict: no "5" for 5 nor true for 1, which an OpenAI server would refuse as well
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None  # OpenAI's {"name", "schema", "strict", "description"}


# vLLM's older request fields for structured output, and the StructuredOutputsParams field each sets.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


class SamplingFields(_Body):
    """The fields completions and chat completions share."""
    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own records; no effect (as in vLLM)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extra fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: int = 0
    # the agentic program and thread a call belongs to (also the X-Program-Id / X-Thread-Id headers)
    program_id: str | None = None
    thread_id: str | None = None

    def refuse_unsupported(self) -> None:
        """400 naming the first field that asks for something this server does not do."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, max_tokens_limit: int | None,
                        default_max_tokens: int | None, renamed: dict[str, str] | None = None) -> SamplingParams:
        """The request's SamplingParams; a bad value is a 400 naming its field (`renamed`: SamplingParams field ->
        the request field it came from, where they differ). An unset max_tokens takes `default_max_tokens` (None:
        what the context leaves), lowered to max_tokens_limit where that is smaller."""
        if max_tokens is None and max_tokens_limit is not None:
            max_tokens = min(default_max_tokens or max_tokens_limit, max_tokens_limit)
        elif max_tokens is None:
            max_tokens = default_max_tokens
        given = {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "min_p", "seed", "stop",
                                                        "stop_token_ids", "min_tokens", "ignore_eos",
                                                        "skip_special_tokens", "include_stop_str_in_output",
                                                        "presence_penalty", "frequency_penalty",
                                                        "repetition_penalty", "allowed_token_ids", "bad_words",
                                                        "prompt_logprobs")}
        kwargs = {name: value for name, value in given.items() if value is not None}
        structured = self.structured_outputs_params()
        try:
            return SamplingParams(n=self.n, max_tokens=max_tokens, logprobs=logprobs, structured_outputs=structured,
                                  logit_bias=_token_keys(self.logit_bias), **kwargs)
        except ValueError as e:
            param = field_of(str(e), set(type(self).model_fields) | {"max_tokens", "logprobs"})
            raise bad_request(str(e), (renamed or {}).get(param, param)) from None


    def structured_source(self) -> str | None:
        """The field that asks for structured output (400 when several do), for errors about it."""
        given = [name for name in ("structured_outputs", *GUIDED_FIELDS) if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise bad_request(f"ask for one kind of structured output; got {', '.join(given)}", given[1])
        return given[0] if given else None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """What the structured-output field asks for, checked (400 naming that field)."""
        source = self.structured_source()
        if source is None:
            return None
        if source == "structured_outputs":
            spec = self.structured_outputs
        elif source in GUIDED_FIELDS:
            spec = {GUIDED_FIELDS[source]: getattr(self, source)}
        elif self.response_format.type == "json_object":
            spec = {"json_object": True}
        else:
            schema = (self.response_format.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise bad_request("response_format of type json_schema needs json_schema.schema, a JSON schema "
                                  "object", "response_format")
            spec = {"json": schema}
        try:
            return StructuredOutputsParams.coerce(spec)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), source) from None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise _unsupported("echo")
        if self.suffix:
            raise _unsupported("suffix")
        if self.best_of not in (None, self.n):
            raise _unsupported("best_of", "best_of other than n")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: text content as one string."""
        text = self.content if isinstance(self.content, str) or self.content is None else "".join(
            part.text for part in self.content)
        return {"role": self.role, "content": text or "", **({"name": self.name} if self.name else {})}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise _unsupported("tools")
        if self.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise bad_request("give max_completion_tokens or max_tokens, not both", "max_completion_tokens")


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def _token_keys(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias names token ids as JSON object keys, so strings: the ids as ints."""
    if bias is None:
        return None
    try:
        return {int(key): value for key, value in bias.items()}
    except ValueError:
        raise bad_request(f"logit_bias keys must be token ids, got {sorted(bias)[:5]}", "logit_bias") from None


def _unsupported(field: str, what: str | None = None) -> Exception:
    return bad_request(f"{what or field} is not supported by this server yet", field)
