"""Generate docs/commands.md from the commands' own --help (``make docs``).

A test compares the file with this output, so the reference cannot go stale.
"""

from __future__ import annotations

import os

HEADER = """# Command reference

Generated from `llmctl COMMAND --help` by `make docs`; do not edit by hand.
Examples and explanations live in [getting-started.md](getting-started.md);
JSON output schemas in [json.md](json.md); exit codes and environment variables
in [configuration.md](configuration.md).
"""


def _help(args: list[str]) -> str:
    from typer.testing import CliRunner

    from llmctl.cli import app

    env = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "TERMINAL_WIDTH": "100"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = CliRunner().invoke(app, [*args, "--help"], env=env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return "\n".join(line.rstrip() for line in result.stdout.strip("\n").splitlines())


def render() -> str:
    from llmctl.cli import app

    commands: list[list[str]] = [[c.name] for c in app.registered_commands if c.name and not c.hidden]
    for group in app.registered_groups:  # a group (`engine`), then each of its commands
        sub = group.typer_instance
        if group.name and sub is not None:
            commands.append([group.name])
            commands += [[group.name, c.name] for c in sub.registered_commands if c.name and not c.hidden]
    parts = [HEADER, "## llmctl\n", "```text", _help([]), "```\n"]
    for command in commands:
        parts += [f"## llmctl {' '.join(command)}\n", "```text", _help(command), "```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
