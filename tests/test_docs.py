"""The docs must not drift from the code: the config key table and the protocol's codes and ops."""

from __future__ import annotations

from pathlib import Path

import pytest

from pie_driver_trtllm.config import option_table_markdown
from pie_driver_trtllm.wire.errors import ErrorCode

DOCS = Path(__file__).resolve().parent.parent / "docs"
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"
OPS = ("handshake", "forward", "fork", "truncate", "release", "health", "stats", "shutdown")


def test_configuration_table_matches_code() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, "exactly one pair of config-table markers"
    between = text.split(START, 1)[1].split(END, 1)[0]
    assert between.startswith("\n"), "the table starts on the line after the start marker"
    assert between[1:] == option_table_markdown(), (
        "docs/configuration.md is stale: paste pie_driver_trtllm.config.option_table_markdown() "
        "between the markers")


@pytest.mark.parametrize("name", [code.value for code in ErrorCode] + list(OPS))
def test_protocol_doc_mentions(name: str) -> None:
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    assert f"`{name}`" in text, f"docs/protocol.md does not mention `{name}`"
