"""Sampling settings: one pydantic model holds their names, types, ranges, defaults and error wording.

Three doors lead in, each typing values and naming settings its own way, and
all end in the same model and the same range checks:

- the flags of ``run`` and ``chat`` (``from_flags``): values Typer has typed;
  errors name the flag (``--top-p``);
- chat's ``/set NAME VALUE`` (``SamplingSettings.with_setting``): text, read as
  leniently as a person types it; errors name the setting;
- the server's request body (``from_request``): JSON values, typed as strictly
  as OpenAI's API types them (no ``"0.5"``, no ``true``), a request's
  ``max_tokens`` capped lower; errors name the API field.

Every error is a ``SettingError`` (a usage error, exit 2) that names its setting.
Importing this module imports pydantic (a quarter of a second): the modules the
CLI loads at startup import it inside functions or for type checking only.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Mapping

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from llmctl.errors import UsageError

# Every generated token is checked against every stop string: an unbounded list makes each
# token cost seconds. OpenAI allows 4; llama-server and Ollama more; 16 leaves room for all uses seen.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# A server's client may ask for at most this many tokens in one request (the CLI's user, for more).
REQUEST_MAX_TOKENS = 1_000_000


class SettingError(UsageError):
    """A sampling setting out of its range or of the wrong type; ``setting`` is its name (``temperature``, ``stop``)."""

    def __init__(self, setting: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.setting = setting


def _whole(value: Any) -> Any:
    """A float without a fractional part (JSON's ``16.0``) as the int it is; anything else as given."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = Annotated[int, BeforeValidator(_whole)]


class SamplingSettings(BaseModel):
    """Sampling knobs, with llama.cpp's own defaults (repeat penalty off, as llama.cpp has it since 2024).

    Frozen: a changed setting is a new, checked model (``with_setting``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    top_k: WholeNumber = Field(default=40, ge=0, le=100_000)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, ge=0.0, le=5.0)
    seed: WholeNumber | None = Field(default=None, ge=0, le=2**32 - 1)  # None: a random seed
    max_tokens: WholeNumber | None = Field(default=None, ge=1, le=10_000_000)  # None: until the model stops or the context is full
    stop: list[str] = Field(default_factory=list)

    @field_validator("max_tokens")
    @classmethod
    def _within_the_request_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = (info.context or {}).get("max_tokens_cap")
        if value is not None and cap is not None and value > cap:
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": cap})
        return value

    @field_validator("stop")
    @classmethod
    def _bounded(cls, stop: list[str]) -> list[str]:
        if len(stop) > MAX_STOP_STRINGS:
            raise PydanticCustomError(
                "stop_strings",
                "{count} stop strings, more than the {limit} allowed",
                {"count": len(stop), "limit": MAX_STOP_STRINGS, "hint": f"give at most {MAX_STOP_STRINGS} stop strings"},
            )
        for text in stop:
            if len(text) > MAX_STOP_CHARS:
                raise PydanticCustomError(
                    "stop_strings",
                    "a stop string of {length} characters, longer than {limit}",
                    {"length": len(text), "limit": MAX_STOP_CHARS, "hint": f"a stop string is at most {MAX_STOP_CHARS} characters"},
                )
        return stop

    def with_setting(self, name: str, raw: str) -> SamplingSettings:
        """These settings with one changed, as chat's ``/set temperature 0.2`` says (``top-p`` is ``top_p``)."""
        key = name.replace("-", "_").lower()
        if key not in type(self).model_fields:
            raise UsageError(f"unknown parameter '{name}'", hint="one of: " + ", ".join(type(self).model_fields))
        value: Any = ([raw] if raw else []) if key == "stop" else raw

        def wrong_type(setting: str, error: ErrorDetails) -> SettingError:
            whole = error["type"].startswith("int_")
            return SettingError(setting, f"{name} needs a {'whole ' if whole else ''}number, not {raw!r}")

        return _checked({**self.model_dump(), key: value}, strict=False, label=str, wrong_type=wrong_type)


def from_flags(**given: Any) -> SamplingSettings:
    """The settings of run's and chat's flags (``temperature=0.2, stop=[...]``; None: not given)."""
    values = {name: value for name, value in given.items() if value is not None}

    def wrong_type(setting: str, error: ErrorDetails) -> SettingError:  # Typer has typed them: a caller's mistake
        return SettingError(setting, f"{_flag(setting)}: {error['msg']}")

    return _checked(values, strict=False, label=_flag, wrong_type=wrong_type)


def from_request(body: Mapping[str, Any]) -> SamplingSettings:
    """The settings of an OpenAI-style request body (``max_completion_tokens`` standing in for ``max_tokens``)."""
    values = {name: body[name] for name in SamplingSettings.model_fields if body.get(name) is not None}
    if "max_tokens" not in values and body.get("max_completion_tokens") is not None:
        values["max_tokens"] = body["max_completion_tokens"]
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]

    def wrong_type(setting: str, error: ErrorDetails) -> SettingError:
        given = error["input"]
        if setting == "stop":
            return SettingError(setting, "'stop' must be a string or a list of strings")
        if isinstance(given, bool) or not isinstance(given, (int, float)):
            return SettingError(setting, f"'{setting}' must be a number")
        if isinstance(given, float):
            return SettingError(setting, f"'{setting}' must be a whole number")
        return SettingError(setting, f"'{setting}' is out of range")  # an integer of hundreds of digits, as a float

    return _checked(values, strict=True, label=str, wrong_type=wrong_type, context={"max_tokens_cap": REQUEST_MAX_TOKENS})


def limits(name: str, *, max_tokens_cap: int | None = None) -> tuple[Any, Any]:
    """The lowest and highest value of a numeric setting."""
    low: Any = None
    high: Any = None
    for rule in SamplingSettings.model_fields[name].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    if name == "max_tokens" and max_tokens_cap is not None:
        high = min(high, max_tokens_cap)
    return low, high


def _checked(
    values: Mapping[str, Any],
    *,
    strict: bool,
    label: Callable[[str], str],
    wrong_type: Callable[[str, ErrorDetails], SettingError],
    context: dict[str, Any] | None = None,
) -> SamplingSettings:
    """Validate ``values``; the first problem becomes a SettingError worded for the door they came through."""
    try:
        return SamplingSettings.model_validate(values, strict=strict, context=context)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
    setting = str(error["loc"][0]) if error["loc"] else "sampling"
    if error["type"] in ("greater_than_equal", "less_than_equal"):
        low, high = limits(setting, max_tokens_cap=(context or {}).get("max_tokens_cap"))
        shown = _shown(error["input"])
        raise SettingError(setting, f"{label(setting)} {shown} is out of range", hint=f"{setting} must be between {low} and {high}") from None
    if error["type"] == "stop_strings":
        raise SettingError(setting, f"{label(setting)}: {error['msg']}", hint=(error.get("ctx") or {}).get("hint")) from None
    raise wrong_type(setting, error) from None


def _shown(value: Any) -> str:
    try:
        text = str(value)
    except ValueError:  # an integer of more than 4,300 digits
        return "(a number too large)"
    return text if len(text) <= 24 else text[:20] + "..."


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
