"""Sampling settings: one model, three doors (CLI flags, chat's /set, a server request), each error naming its setting."""

from __future__ import annotations

import re

import pytest

from llmctl import options
from llmctl.engine.sampling import REQUEST_MAX_TOKENS, SamplingSettings, SettingError, from_flags, from_request, limits
from llmctl.errors import UsageError


def test_defaults_are_llama_cpps_and_the_flags_help_says_them() -> None:
    s = SamplingSettings()
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty, s.seed, s.max_tokens, s.stop) == (0.8, 0.95, 40, 0.05, 1.0, None, None, [])
    helps = {
        "temperature": options.TemperatureOpt,
        "top_p": options.TopPOpt,
        "top_k": options.TopKOpt,
        "min_p": options.MinPOpt,
        "repeat_penalty": options.RepeatPenaltyOpt,
    }
    for name, alias in helps.items():
        text = alias.__metadata__[0].help
        assert re.search(rf"\(default {re.escape(str(getattr(s, name)))}\b", text), (name, text)


def test_flags_name_the_flag() -> None:
    assert from_flags(temperature=0.2, top_k=5, stop=["END"], seed=None) == SamplingSettings(temperature=0.2, top_k=5, stop=["END"])
    with pytest.raises(SettingError) as caught:
        from_flags(temperature=-1.0)
    assert caught.value.setting == "temperature" and caught.value.message == "--temperature -1.0 is out of range"
    assert caught.value.hint == "temperature must be between 0.0 and 5.0"
    with pytest.raises(SettingError, match=r"^--top-p 1.5 is out of range$"):
        from_flags(top_p=1.5)
    with pytest.raises(SettingError, match=r"^--max-tokens 0 is out of range$") as caught:
        from_flags(max_tokens=0)
    assert caught.value.hint == "max_tokens must be between 1 and 10000000"  # the CLI's user may ask for more than a client
    with pytest.raises(SettingError, match=r"^--stop: 17 stop strings, more than the 16 allowed$"):
        from_flags(stop=["x"] * 17)
    with pytest.raises(SettingError, match=r"^--stop: a stop string of 257 characters, longer than 256$"):
        from_flags(stop=["x" * 257])
    assert from_flags(stop=["x" * 256] * 16).stop == ["x" * 256] * 16


def test_set_reads_text_and_names_the_setting() -> None:
    s = SamplingSettings()
    changed = s.with_setting("Top-K", "5").with_setting("temperature", "0.2").with_setting("seed", "7").with_setting("stop", "END")
    assert (changed.top_k, changed.temperature, changed.seed, changed.stop) == (5, 0.2, 7, ["END"])
    assert changed.with_setting("stop", "").stop == [] and s == SamplingSettings()  # a new model; the old one is unchanged
    with pytest.raises(SettingError, match=r"^temperature 9 is out of range$"):
        s.with_setting("temperature", "9")
    with pytest.raises(SettingError, match=r"^top_k needs a whole number, not '5.5'$"):
        s.with_setting("top_k", "5.5")
    with pytest.raises(SettingError, match=r"^min-p needs a number, not 'lots'$"):
        s.with_setting("min-p", "lots")
    with pytest.raises(SettingError, match=r"^stop: a stop string of 300 characters"):
        s.with_setting("stop", "x" * 300)
    with pytest.raises(UsageError, match="unknown parameter 'warmth'") as caught:
        s.with_setting("warmth", "1")
    assert caught.value.hint == "one of: temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens, stop"


@pytest.mark.parametrize(
    ("body", "setting", "message"),
    [
        ({"temperature": float("nan")}, "temperature", "temperature nan is out of range"),
        ({"top_k": -3}, "top_k", "top_k -3 is out of range"),
        ({"top_k": 5.5}, "top_k", "'top_k' must be a whole number"),
        ({"seed": float("inf")}, "seed", "'seed' must be a whole number"),
        ({"top_k": True}, "top_k", "'top_k' must be a number"),
        ({"temperature": "0.5"}, "temperature", "'temperature' must be a number"),
        ({"temperature": 10**400}, "temperature", "'temperature' is out of range"),
        ({"max_tokens": 10**400}, "max_tokens", "max_tokens 10000000000000000000... is out of range"),
        ({"max_tokens": REQUEST_MAX_TOKENS + 1}, "max_tokens", f"max_tokens {REQUEST_MAX_TOKENS + 1} is out of range"),
        ({"max_completion_tokens": 0}, "max_tokens", "max_tokens 0 is out of range"),
        ({"stop": 5}, "stop", "'stop' must be a string or a list of strings"),
        ({"stop": ["a", 1]}, "stop", "'stop' must be a string or a list of strings"),
        ({"stop": ["x"] * 17}, "stop", "stop: 17 stop strings, more than the 16 allowed"),
    ],
)
def test_a_request_is_typed_strictly_and_names_the_field(body: dict, setting: str, message: str) -> None:
    with pytest.raises(SettingError) as caught:
        from_request(body)
    assert (caught.value.setting, caught.value.message) == (setting, message)
    if "out of range" in message and setting == "max_tokens":
        assert caught.value.hint == f"max_tokens must be between 1 and {REQUEST_MAX_TOKENS}"


def test_a_request_takes_whole_floats_a_single_stop_and_ignores_other_fields() -> None:
    s = from_request({"model": "m", "messages": [], "temperature": 0, "max_tokens": 16.0, "seed": None, "stop": "END"})
    assert s == SamplingSettings(temperature=0.0, max_tokens=16, stop=["END"])
    assert isinstance(s.max_tokens, int)
    assert from_request({"max_completion_tokens": 8}).max_tokens == 8
    assert from_request({"max_tokens": 4, "max_completion_tokens": 8}).max_tokens == 4


def test_limits_come_from_the_model() -> None:
    assert limits("temperature") == (0.0, 5.0) and limits("seed") == (0, 2**32 - 1)
    assert limits("max_tokens", max_tokens_cap=REQUEST_MAX_TOKENS) == (1, REQUEST_MAX_TOKENS)


def test_settings_are_frozen() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        SamplingSettings().temperature = 3.0  # type: ignore[misc]
