"""`pie-driver-trtllm demo`: start a real driver subprocess on a random-weight model and act as its host.

It shows the protocol a host speaks: batched forwards over many contexts (greedy and sampled), the host
sending each sampled token back as the next step's input, a fork, a rollback and the driver's counters;
then runs of up to 16 tokens per forward (protocol 1.1) next to the one-token loop they equal.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pie_driver_trtllm.client import DriverClient, DriverFailed, DriverProcess, RequestFailed, spawn

FIRST_TOKEN = 3  # ids 0, 1 and 2 are pad, bos and eos in the generated checkpoints
PROMPT_MAX = 6  # prompts are 3 to 6 tokens


class DemoError(RuntimeError):
    """A driver reply or setup problem worth one clear line instead of a traceback."""


@dataclass
class Context:
    """The host's view of one context: the driver holds prompt + generated[:-1]; generated[-1] is pending."""

    id: int
    sampler: dict[str, Any]
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    shown_from: int = 0  # a fork shows only the tokens it made itself
    note: str = ""

    @property
    def label(self) -> str:
        if self.sampler["type"] == "greedy":
            return "greedy"
        seed = f" seed {self.sampler['seed']}" if "seed" in self.sampler else ""
        return f"top-k/p{seed}"

    def request(self) -> dict[str, Any]:
        """The next step: the whole prompt first, then the pending token at its absolute position."""
        if not self.generated:
            tokens, positions = self.prompt, list(range(len(self.prompt)))
        else:
            tokens, positions = [self.generated[-1]], [len(self.prompt) + len(self.generated) - 1]
        return self.make_request(tokens, positions)

    def make_request(self, tokens: list[int], positions: list[int]) -> dict[str, Any]:
        return {"context": self.id, "tokens": tokens, "positions": positions,
                "samplers": [{**self.sampler, "at": len(tokens) - 1}]}


def make_contexts(count: int, vocab_size: int) -> list[Context]:
    """Distinct short prompts; even ids greedy, odd ids sampled, every other sampled one seeded."""
    contexts = []
    for i in range(count):
        rng = random.Random(1000 + i)
        prompt = [rng.randrange(FIRST_TOKEN, vocab_size) for _ in range(PROMPT_MAX - 3 + i % 4)]
        sampler: dict[str, Any] = {"type": "greedy"}
        if i % 2:
            sampler = {"type": "top_k_top_p", "temperature": 0.8, "top_k": 40, "top_p": 0.95}
            if i % 4 == 1:
                sampler["seed"] = 100 + i
        contexts.append(Context(i, sampler, prompt))
    return contexts


def write_config(workdir: Path, model: Path, device: str, dtype: str, contexts: int = 8, steps: int = 24) -> Path:
    """The driver's startup TOML; its limits fit the demo, so the engine reserves KV for this much only."""
    # json.dumps writes strings and lists exactly as TOML reads them.
    lines = ["[model]", f"snapshot_dir = {json.dumps(str(model))}", "", "[driver]",
             f"device = {json.dumps([device])}", f"activation_dtype = {json.dumps(dtype)}", "",
             "[driver.options]", 'engine = "reference"',
             f"max_concurrent_requests = {contexts + 1}",  # the contexts and the one fork
             f"max_seq_len = {PROMPT_MAX + steps + 1}"]
    path = workdir / "driver.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def forward(client: DriverClient, batch: list[tuple[Context, dict[str, Any]]]) -> list[int]:
    """One batched forward; a per-request error becomes a DemoError naming its context."""
    results = client.forward([request for _, request in batch])
    tokens = []
    for (ctx, _), result in zip(batch, results, strict=True):
        if not result.get("ok"):
            error = result.get("error") or {}
            raise DemoError(f"context {ctx.id}: {error.get('code')}: {error.get('message')}")
        tokens.append(result["outputs"][0]["token"])
    return tokens


def short(tokens: list[int], head: int = 4, tail: int = 2) -> str:
    if len(tokens) <= head + tail + 1:
        return " ".join(map(str, tokens))
    return f"{' '.join(map(str, tokens[:head]))} … {' '.join(map(str, tokens[-tail:]))} ({len(tokens)})"


def decode(client: DriverClient, contexts: list[Context], steps: int, vocab_size: int,
           console: Console) -> tuple[int, int, float]:
    """Run `steps` batched forwards with one fork and one rollback; return tokens, forwards, seconds."""
    fork_step, rollback_step = steps // 2, max(3, steps * 3 // 4)
    parent, rolled = contexts[0], contexts[2]
    served = forwards = 0
    columns = (TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    start = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("decode", total=steps)
        for step in range(steps):
            if step == fork_step:
                # The driver copies the parent's history (prompt + generated[:-1]); the fork inherits the
                # pending token too and samples with its own seed, so it branches off the parent.
                child = Context(len(contexts), {"type": "top_k_top_p", "temperature": 0.8, "top_k": 40,
                                                "top_p": 0.95, "seed": 7}, parent.prompt,
                                list(parent.generated), shown_from=len(parent.generated))
                length = client.call("fork", src=parent.id, dst=child.id)["length"]
                child.note = f"fork of #{parent.id} at pos {length}"
                parent.note = f"forked → #{child.id} at pos {length}"
                contexts.append(child)
            batch = [(ctx, ctx.request()) for ctx in contexts]
            if step == rollback_step:
                # Re-sending a different token at an earlier position cuts the driver's history there;
                # the host drops its own tokens from that point in the same way.
                keep = len(rolled.generated) // 2
                position = len(rolled.prompt) + keep
                # Any other ordinary token will do; this one differs from the one it replaces.
                token = FIRST_TOKEN + (rolled.generated[keep] + 1 - FIRST_TOKEN) % (vocab_size - FIRST_TOKEN)
                rolled.generated = [*rolled.generated[:keep], token]
                rolled.note = f"rolled back at pos {position}"
                batch = [(ctx, ctx.make_request([token], [position]) if ctx is rolled else request)
                         for ctx, request in batch]
            for (ctx, _), token in zip(batch, forward(client, batch), strict=True):
                ctx.generated.append(token)
            served += len(batch)
            forwards += 1
            progress.advance(task)
    return served, forwards, time.perf_counter() - start


def show_runs(client: DriverClient, vocab_size: int, console: Console, tokens: int = 32) -> None:
    """Protocol 1.1: each context gets up to 16 tokens per forward and feeds back the ones it keeps; a
    seeded run equals the one-token loop given the per-step seeds (the seed plus the step)."""
    rng = random.Random(7)
    prompt = [rng.randrange(FIRST_TOKEN, vocab_size) for _ in range(5)]
    for offset, sampler in enumerate(({"type": "greedy"}, {"type": "top_k", "top_k": 40, "seed": 5})):
        context = 10_000 + offset
        runs = client.generate(context, prompt, sampler, tokens, max_tokens=16)
        loop = client.generate(context + 100, prompt, sampler, tokens, max_tokens=1)
        same = "equal" if runs.tokens == loop.tokens else "DIFFERENT"
        console.print(f"runs: {sampler['type']}, {len(runs.tokens)} tokens in {runs.round_trips} forwards "
                      f"(max_tokens 16) against {loop.round_trips} one token at a time: {same}",
                      highlight=False, soft_wrap=True)
        if same != "equal":
            raise DemoError(f"a {sampler['type']} run differs from its one-token loop")
    client.call("release", contexts=[10_000, 10_001, 10_100, 10_101])


def show_table(console: Console, contexts: list[Context]) -> None:
    table = Table(box=box.SIMPLE_HEAD, caption_justify="left",
                  caption="top-k/p: top_k_top_p, T 0.8, top_k 40, top_p 0.95. (n): tokens in all; "
                          "a fork lists only the tokens it made itself.")
    for name, style in (("ctx", "bold"), ("sampler", "cyan"), ("prompt", ""), ("generated", "green"),
                        ("note", "yellow")):
        table.add_column(name, style=style or None, overflow="fold")
    for ctx in contexts:
        table.add_row(str(ctx.id), ctx.label, short(ctx.prompt), short(ctx.generated[ctx.shown_from:]),
                      ctx.note)
    console.print(table)


def run(contexts: int, steps: int, size: str, workdir: Path, console: Console) -> None:
    import torch  # only to pick the device; the driver loads the model itself

    from pie_driver_trtllm.modelgen import SIZES, make_model

    if size not in SIZES:
        raise DemoError(f"size {size!r} is not one of {', '.join(SIZES)}")
    if contexts < 8 or steps < 4:
        raise DemoError("the demo needs --contexts 8 or more and --steps 4 or more")
    workdir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda:0", "bfloat16") if cuda else ("cpu", "float32")
    with console.status(f"making the {size} random-weight model in {workdir}"):
        from transformers.utils import logging

        logging.disable_progress_bar()  # its shard bar would garble our status line
        model = make_model(workdir / f"model-{size}", size, seed=0)
    config = write_config(workdir, model, device, dtype, contexts, steps)
    with console.status("starting the driver subprocess"):
        process: DriverProcess = spawn(config)
    client = process.client()
    try:
        hello = client.call("handshake").result
        vocab_size = int(hello["model"]["vocab_size"])
        console.print(f"driver {hello['driver']['name']} {hello['driver']['version']}, engine "
                      f"{hello['engine']['kind']} on {device} ({dtype}), model vocab {vocab_size}, "
                      f"endpoint {process.endpoint}", highlight=False, soft_wrap=True)
        table = make_contexts(contexts, vocab_size)
        served, forwards, seconds = decode(client, table, steps, vocab_size, console)
        stats = client.call("stats").result
        show_table(console, table)
        console.print(f"summary: {len(table)} contexts, {served} tokens in {seconds:.3f} s "
                      f"({served / seconds:.1f} tokens/s), {forwards} forwards, {stats['engine_calls']} "
                      f"engine calls, {stats['lookahead_hits']} lookahead hits",
                      highlight=False, soft_wrap=True)
        show_runs(client, vocab_size, console, tokens=min(32, int(hello["model"]["max_model_len"]) - 5))
    except (DemoError, RequestFailed, TimeoutError) as exc:
        raise DemoError(f"{exc} (driver log: {process.stderr_path})") from exc
    finally:
        client.close()
        code = process.stop()  # SIGTERM: the driver finishes, removes its socket and exits 0
    if code != 0:
        raise DemoError(f"the driver exited with status {code} on SIGTERM (log: {process.stderr_path})")


def run_demo(contexts: int = 8, steps: int = 24, size: str = "small", workdir: Path | None = None) -> int:
    """Run the demo; 0 on success, 1 (with one error line on standard error) on failure."""
    console = Console()
    if not console.is_terminal:  # piped output has no width to respect; keep table rows on one line
        console.width = max(console.width, 120)
    try:
        run(contexts, steps, size, Path(workdir) if workdir else Path.cwd() / ".demo", console)
    except (DemoError, DriverFailed, OSError) as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return 1
    return 0
