"""Paths and settings, resolved once: flag > environment > config file > default.

Environment variables read here (documented in docs/configuration.md):

- ``LLMCTL_HOME``   where llmctl keeps its index, copies and caches
                    (default: the platform's user data dir, e.g. ~/.local/share/llmctl)
- ``LLMCTL_CONFIG`` the config file (default: $LLMCTL_HOME/config.toml)
- ``LLMCTL_DEBUG``  1 shows tracebacks and llama.cpp's own logs
- ``HF_HUB_CACHE`` / ``HF_HOME`` / ``XDG_CACHE_HOME``  the Hugging Face cache, as
                    huggingface_hub resolves it, so pulled files are shared with it
- ``NO_COLOR``      any value turns colour off
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError

ENV_HOME = "LLMCTL_HOME"
ENV_CONFIG = "LLMCTL_CONFIG"
ENV_DEBUG = "LLMCTL_DEBUG"

# Keys a config file may hold, with their types; anything else is reported.
CONFIG_KEYS: dict[str, type] = {
    "hf_hub_cache": str,
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def debug_enabled() -> bool:
    """LLMCTL_DEBUG; read directly so error reporting works even when settings cannot load."""
    return _truthy(os.environ.get(ENV_DEBUG))


def no_color() -> bool:
    """NO_COLOR (https://no-color.org): any non-empty value."""
    return bool(os.environ.get("NO_COLOR"))


def _default_home() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("llmctl", appauthor=False))


def _default_hf_hub_cache() -> Path:
    # huggingface_hub.constants' default, without importing it (slow).
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(
            f"config file {path} cannot be read: {exc}",
            hint=f"fix or remove it, or point {ENV_CONFIG} elsewhere",
        ) from None
    for key, value in data.items():
        expected = CONFIG_KEYS.get(key)
        if expected is None:
            raise UsageError(
                f"config file {path}: unknown key '{key}'",
                hint="known keys: " + ", ".join(sorted(CONFIG_KEYS)),
            )
        if not isinstance(value, expected):
            raise UsageError(
                f"config file {path}: '{key}' must be a {expected.__name__}",
                hint="see docs/configuration.md",
            )
    return data


def config_file_warning() -> str | None:
    """What is wrong with the file LLMCTL_CONFIG names, if it is not there; None otherwise.

    A missing default config file is normal; one named on purpose is a typo or a
    moved file, and its settings silently not applying would puzzle.
    """
    value = os.environ.get(ENV_CONFIG)
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return None
    what = "is a folder, not a file" if path.is_dir() else "does not exist"
    return f"{ENV_CONFIG} names {path}, which {what}; using the defaults"


@dataclass(frozen=True)
class Settings:
    """Everything path- or environment-dependent, resolved once per process."""

    home: Path
    config_file: Path
    hf_hub_cache: Path
    debug: bool
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def index_path(self) -> Path:
        return self.home / "index.json"

    @property
    def models_dir(self) -> Path:
        """Where llmctl keeps files it owns (``import --copy``)."""
        return self.home / "models"


def resolve(flag: Any, env_var: str | None, config: dict[str, Any], key: str | None, default: Any) -> Any:
    """Apply the precedence every setting follows: flag > env > config file > default."""
    if flag is not None:
        return flag
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    if key and key in config:
        return config[key]
    return default() if callable(default) else default


def load_settings(home: str | None = None) -> Settings:
    home_path = Path(resolve(home, ENV_HOME, {}, None, _default_home)).expanduser()
    config_file = Path(resolve(None, ENV_CONFIG, {}, None, home_path / "config.toml")).expanduser()
    config = _read_config_file(config_file)
    # HF_HUB_CACHE, then HF_HOME/hub, count as the environment level.
    hub_env = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    hub_cache = Path(resolve(hub_env, None, config, "hf_hub_cache", _default_hf_hub_cache)).expanduser()
    return Settings(
        home=home_path,
        config_file=config_file,
        hf_hub_cache=hub_cache,
        debug=debug_enabled(),
        config=config,
    )


_settings: Settings | None = None


def get_settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def set_settings(settings: Settings | None) -> None:
    """Install settings for this process (the CLI callback and tests use it)."""
    global _settings
    _settings = settings
