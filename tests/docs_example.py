"""The worked example of docs/protocol.md, made from the replies of a live driver.

`tests/test_docs_example.py` runs it against a driver on the tiny random-weight checkpoint and compares it
with the page. To rewrite the page after a deliberate change, from the repository root:

    PYTHONPATH=$PWD python tests/docs_example.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import msgpack

from pie_driver_trtllm.client import DriverClient

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
START = "<!-- worked-example:start -->"
END = "<!-- worked-example:end -->"
INDENT = " " * 11
FLOAT = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?")

STEP_1 = {"v": 1, "id": 7, "op": "forward",
          "requests": [{"context": 1, "tokens": [1, 15, 99], "positions": [0, 1, 2],
                        "samplers": [{"at": 2, "type": "greedy"}]}]}
# Step 1's request split by element: each line's hex, then what it encodes.
STEP_1_BYTES = """\
84                                  map, 4 pairs
a1 76  01                           "v" : 1
a2 6964  07                         "id" : 7
a2 6f70  a7 666f7277617264          "op" : "forward"
a8 7265717565737473  91             "requests" : array of 1
  84                                  map, 4 pairs
  a7 636f6e74657874  01               "context" : 1
  a6 746f6b656e73  93 01 0f 63        "tokens" : [1, 15, 99]
  a9 706f736974696f6e73  93 00 01 02  "positions" : [0, 1, 2]
  a8 73616d706c657273  91             "samplers" : array of 1
    82 a2 6174 02 a4 74797065 a6 677265656479   {"at": 2, "type": "greedy"}"""


def annotated_hex(annotated: str) -> bytes:
    """The bytes an annotated dump spells: on each line, the hex pairs before the description."""
    out = bytearray()
    for line in annotated.splitlines():
        for word in line.split():
            if not re.fullmatch(r"(?:[0-9a-f]{2})+", word):
                break
            out += bytes.fromhex(word)
    return bytes(out)


def exchange(client: DriverClient, request: dict[str, Any]) -> tuple[bytes, bytes]:
    """Send one request as msgpack and return (request bytes, reply bytes)."""
    frame = msgpack.packb(request)
    client.send_raw(frame)
    if not client.socket.poll(60_000):
        raise TimeoutError(f"no reply to request {request['id']}")
    return frame, client.socket.recv()


def show(label: str, message: dict[str, Any]) -> str:
    """One message as JSON, its list of requests or results one entry per line."""
    listed = "requests" if "requests" in message else "results" if "results" in message else None
    if listed is None:
        return f"{label:<9}{_json(message)}"
    head = _json({k: v for k, v in message.items() if k != listed})[:-1]
    entries = f",\n{INDENT}".join(_json(entry) for entry in message[listed])
    return f'{label:<9}{head}, "{listed}": [\n{INDENT}{entries}]}}'


def _json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def worked_example(client: DriverClient) -> str:
    """The example's markdown, from three forwards and a `stats` on a fresh driver."""
    frame, reply_1 = exchange(client, STEP_1)
    assert frame == annotated_hex(STEP_1_BYTES), "the annotated bytes of step 1 are not what msgpack writes"
    token = msgpack.unpackb(reply_1)["results"][0]["outputs"][0]["token"]
    step_2 = {"v": 1, "id": 8, "op": "forward",
              "requests": [{"context": 1, "tokens": [token], "positions": [3],
                            "samplers": [{"at": 0, "type": "greedy"}, {"at": 0, "type": "dist", "k": 2}]}]}
    _, reply_2 = exchange(client, step_2)
    step_3 = {"v": 1, "id": 9, "op": "forward",
              "requests": [{"context": 1, "tokens": [7], "positions": [6], "samplers": [{"at": 0, "type": "greedy"}]}]}
    _, reply_3 = exchange(client, step_3)
    stats = client.call("stats").result
    del stats["engine_s"]  # a time: it differs on every run
    stats_text = textwrap.fill(_json(stats), 100, break_on_hyphens=False, break_long_words=False)
    token_hex = msgpack.packb(token).hex()
    return f"""\
Step 1 prefills context 1 with three tokens and samples greedily after the third:

```
{show("request", STEP_1)}
{show("reply", msgpack.unpackb(reply_1))}
```

The request is {len(frame)} bytes of msgpack (from `msgpack.packb`), split here by element:

```
{STEP_1_BYTES}
```

The {len(reply_1)}-byte reply: `{reply_1.hex()}`
(`{token_hex[:2]} {token_hex[2:]}` is the {_int_kind(token_hex)} {token}).

Step 2 sends the sampled token back at position 3 and asks for a greedy token plus the top-2
distribution; the greedy token came from the lookahead buffer filled in step 1:

```
{show("request", step_2)}
{show("reply", msgpack.unpackb(reply_2))}
```

Step 3 skips ahead to position 6 of a 4-token history and is refused without changing it:

```
{show("request", step_3)}
{show("reply", msgpack.unpackb(reply_3))}
```

`stats` afterwards (less `engine_s`, a time that differs on every run):

```
{stats_text}
```
"""


def _int_kind(encoded: str) -> str:
    return {"cc": "uint8", "cd": "uint16", "ce": "uint32"}.get(encoded[:2], "positive fixint")


def documented() -> str:
    """The example as docs/protocol.md has it (between its markers)."""
    text = PROTOCOL.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, "exactly one pair of worked-example markers"
    return text.split(START, 1)[1].split(END, 1)[0].removeprefix("\n")


def same_but_rounding(a: str, b: str, rel_tol: float = 1e-5) -> bool:
    """Equal text, except that floats may differ in their last digits (other CPUs round differently)."""
    if FLOAT.sub("<float>", a) != FLOAT.sub("<float>", b):
        return False
    pairs = zip(FLOAT.findall(a), FLOAT.findall(b), strict=True)
    return all(abs(float(x) - float(y)) <= rel_tol * max(abs(float(x)), abs(float(y))) for x, y in pairs)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import write_config

    from pie_driver_trtllm.client import spawn
    from pie_driver_trtllm.modelgen import make_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "tiny", "tiny", seed=0)
        process = spawn(write_config(Path(tmp), model))
        try:
            client = process.client()
            example = worked_example(client)
            client.close()
        finally:
            process.stop()
    text = PROTOCOL.read_text(encoding="utf-8")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    PROTOCOL.write_text(f"{before}{START}\n{example}{END}{after}", encoding="utf-8")
    print(f"rewrote the worked example in {PROTOCOL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

