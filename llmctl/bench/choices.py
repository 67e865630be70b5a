"""The fixed choices of ``bench``'s options, apart from the modules that act on them, so that the
command line can offer them without importing the measuring, reporting or serving code."""

from __future__ import annotations

from enum import Enum


class ReportFormat(str, Enum):
    """``bench --output``: how results are written (llama-bench's formats, plus a terminal table)."""

    table = "table"
    md = "md"
    csv = "csv"
    json = "json"
    jsonl = "jsonl"


class Endpoint(str, Enum):
    """``bench --endpoint``: the API the clients call."""

    completions = "completions"  # POST /v1/completions: the prompt as it is
    chat = "chat"  # POST /v1/chat/completions: the prompt as one user message, through the chat template
