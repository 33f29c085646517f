"""A doctor report: each check with its status, what was found and the fix, as JSON or as text."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Check:
    name: str
    status: str  # PASS, WARN or FAIL
    found: str
    fix: str = ""


def finish_report(report: dict[str, Any], checks: list[Check]) -> dict[str, Any]:
    report["checks"] = [asdict(c) for c in checks]
    report["summary"] = {s.lower(): sum(c.status == s for c in checks) for s in ("PASS", "WARN", "FAIL")}
    report["ok"] = report["summary"]["fail"] == 0
    return report


def format_report(report: dict[str, Any], color: bool = False, started: float | None = None) -> str:
    """Human text: one line per check, the fix indented under it, then a summary line."""
    lines = [f"pie-driver-trtllm doctor: driver tensorrt_llm, engine {report['engine']}"]
    width = max([len(c["name"]) for c in report["checks"]] + [12])
    for c in report["checks"]:
        found = c["found"].replace("\n", "\n" + " " * (width + 10))
        lines.append(f"  {c['status']}  {c['name']:<{width}}  {found}")
        if c["fix"]:
            lines.append(f"  {'':4}  {'':<{width}}  fix: {c['fix']}")
    s = report["summary"]
    took = f" in {time.time() - started:.1f} s" if started else ""
    if s["fail"]:
        lines.append(f"✗ {s['fail']} failed, {s['warn']} warning(s), {s['pass']} passed{took}. "
                     "Apply the fixes above and run `pie-driver-trtllm doctor` again.")
    elif s["warn"]:
        lines.append(f"! Ready with warnings ({s['pass']} passed, {s['warn']} warning(s)){took}.")
    else:
        lines.append(f"✓ All checks passed ({s['pass']} checks){took}.")
    return "\n".join(lines)


def print_report(report: dict[str, Any], started: float | None = None) -> None:
    """The report on standard output, statuses coloured on a terminal (rich: NO_COLOR is honoured)."""
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    text = format_report(report, started=started)
    if console.no_color or not console.is_terminal:
        print(text)
        return
    styles = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}
    for line in text.splitlines():
        text = Text(line)
        status = line[2:6]
        if status in styles and line.startswith("  "):
            text.stylize(f"bold {styles[status]}", 2, 6)
        console.print(text)
