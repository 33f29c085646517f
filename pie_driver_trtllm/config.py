"""Startup configuration: the one typed source of truth for every key the driver reads.

The host writes a TOML file with `[model]`, `[driver]` and `[driver.options]`. Each key is a msgspec
`Struct` field below whose annotation holds its type, its rule and its documentation; `load_config`
decodes the file once and fails with a single line naming the key, the value and what is allowed
(`config_rules.py` words msgspec's error that way and renders the documentation table).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import Meta, Struct, field

from pie_driver_trtllm.config_rules import explain, table_rows

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli keeps older interpreters working
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10 and older
    import tomli as tomllib

__all__ = ["DTYPES", "ENGINE_ALIASES", "MAX_LOOKAHEAD", "U32_MAX", "DriverConfig", "DriverOptions", "DriverSection",
           "ModelSection", "StartupError", "load_config", "option_table_markdown", "parse_config"]

EngineName = Literal["tensorrt_llm", "tensorrt-llm", "trtllm", "reference"]
Dtype = Literal["auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float"]
ENGINE_ALIASES = {name: "reference" if name == "reference" else "tensorrt_llm" for name in get_args(EngineName)}
DTYPES = get_args(Dtype)
MAX_LOOKAHEAD = 16
U32_MAX = 2**32 - 1
SEED_MAX = 2**64 - 1
DEVICE = r"^(cpu|cuda(:\d+)?)$"

# A nullable bounded number nests its bounds inside the union (msgspec puts bounds on numbers only).
U32 = Annotated[int, Meta(ge=1, le=U32_MAX)]


class StartupError(Exception):
    """A problem that stops the driver before it is ready; its text is the one line printed to stderr."""


class DriverOptions(Struct, forbid_unknown_fields=True):
    """`[driver.options]`: the user's `[model.driver.options]` table."""

    engine: Annotated[EngineName, Meta(description=(
        "Engine: `tensorrt_llm` (aliases `tensorrt-llm`, `trtllm`) or `reference` (PyTorch + transformers)."))] \
        = "tensorrt_llm"
    lookahead_tokens: Annotated[int, Meta(ge=1, le=MAX_LOOKAHEAD, description=(
        "Greedy tokens generated per engine call and served one per host step; 1 turns lookahead off."))] = 16
    execution_mode: Annotated[Literal["generate", "pyexecutor"], Meta(description=(
        "TensorRT-LLM path: public `LLM.generate` or the experimental private `pyexecutor` loop."))] = "generate"
    trust_remote_code: Annotated[bool | None, Meta(description=(
        "Run a checkpoint's own Python code (`auto_map`) at load. Unset: false for the reference engine, true for "
        "TensorRT-LLM (its documented default; a warning says so)."))] = None
    skip_tokenizer_init: Annotated[bool, Meta(description=(
        "Passed to `tensorrt_llm.LLM`; the host sends token ids."))] = True
    backend: Annotated[str | None, Meta(description="TensorRT-LLM backend override.")] = None
    attn_backend: Annotated[str | None, Meta(description="TensorRT-LLM attention backend override.")] = None
    enable_chunked_prefill: Annotated[bool | None, Meta(description="TensorRT-LLM chunked prefill.")] = None
    max_seq_len: Annotated[U32 | None, Meta(description=(
        "Runtime sequence cap; also clamps `max_model_len`."))] = None
    max_batch_size: Annotated[Annotated[int, Meta(ge=1, le=1 << 20)] | None, Meta(description=(
        "TensorRT-LLM runtime batch-size cap."))] = None
    max_num_tokens: Annotated[Annotated[int, Meta(ge=1, le=1 << 24)] | None, Meta(description=(
        "TensorRT-LLM runtime token cap."))] = None
    kv_cache_free_gpu_memory_fraction: Annotated[Annotated[float, Meta(ge=0.01, lt=1.0)] | None, Meta(description=(
        "Fraction of free GPU memory TensorRT-LLM gives its KV cache; must be below 1.0."))] = None
    llm_kwargs: Annotated[dict[str, Any], Meta(description=(
        "Passed through to `tensorrt_llm.LLM(...)`; wins over curated keys."))] = {}
    pyexecutor_max_tokens: Annotated[int, Meta(ge=1, le=1 << 20, description=(
        "Continuation window of one private executor request."))] = 4096
    pyexecutor_worker_stop_timeout_s: Annotated[float, Meta(ge=0.0, le=3600.0, description=(
        "Join timeout when stopping TensorRT-LLM's worker."))] = 30.0
    enable_cache_salt: Annotated[bool, Meta(description="Give each context its own TensorRT-LLM cache salt.")] = True
    rl_ops: Annotated[bool, Meta(description=(
        "TensorRT-LLM `generate` mode: start `LLM` on the Ray orchestrator with `enable_sleep` and the RLHF worker "
        "extension, so that `load_weights`, `sleep` and `wake` work (needs `ray`; its virtual-memory allocator "
        "costs some speed)."))] = False
    reference_compile: Annotated[bool, Meta(description=(
        "Reference engine on CUDA: `torch.compile` the per-layer elementwise work of the captured decode step "
        "(about 10% faster; the first step of each batch size compiles for a second or two)."))] = True
    reference_overlap: Annotated[bool, Meta(description=(
        "Reference engine on CUDA: when a step repeats the decode step the previous one predicted (each context "
        "fed the token it was given), launch the next predicted step before replying, so the GPU works while the "
        "reply travels; a step that differs discards it."))] = True
    max_concurrent_requests: Annotated[int, Meta(ge=1, le=1 << 16, description=(
        "Advertised and enforced `max_forward_requests`."))] = 128
    max_batched_tokens: Annotated[int, Meta(ge=1, le=1 << 20, description=(
        "Advertised and enforced `max_forward_tokens`; also the advertised `max_logit_rows` and `max_prob_rows` "
        "(enforced: `logprobs` and `dist` samplers per forward)."))] = 8192
    max_sampler_rows: Annotated[int, Meta(ge=1, le=1 << 20, description=(
        "Advertised and enforced `max_sampler_rows`: samplers of every type in one forward."))] = 8192
    max_output_elements: Annotated[int, Meta(ge=1, le=1 << 24, description=(
        "Advertised and enforced `max_output_elements`: the sum of `dist` `k` and of `logprobs` `token_ids` "
        "counts in one forward, plus one per `return_logprob` sampler (about 14 bytes of reply each)."))] = 1 << 20
    virtual_kv_page_size: Annotated[int, Meta(ge=1, le=1 << 16, description=(
        "Advertised (virtual) `kv_page_size`."))] = 16
    virtual_total_pages: Annotated[int, Meta(ge=1, le=U32_MAX, description=(
        "Advertised (virtual) `total_pages` and `max_page_refs`."))] = 65536
    max_logprob_labels: Annotated[int, Meta(ge=0, le=1 << 20, description=(
        "Most `token_ids` of one `logprobs` sampler."))] = 1024
    max_session_histories: Annotated[int, Meta(ge=1, le=1 << 24, description=(
        "Context histories kept; the least recently used is evicted."))] = 65536
    max_queued_requests: Annotated[int, Meta(ge=1, le=1 << 20, description=(
        "State ops held waiting behind the running one (all connections); more get CAPACITY with "
        "`busy: true`."))] = 256
    max_queued_bytes: Annotated[int, Meta(ge=1024, le=1 << 34, description=(
        "Frame bytes of the state ops held waiting; past it a frame gets CAPACITY with `busy: true`."))] = 64 << 20
    max_connections: Annotated[int, Meta(ge=1, le=1 << 16, description=(
        "Connections the socket holds at once; one accepted past it is closed at once (newest first; the "
        "connections already served keep theirs)."))] = 64
    max_unread_reply_bytes: Annotated[int, Meta(ge=1 << 16, le=1 << 34, description=(
        "Reply bytes one connection may leave unread in the driver; a reply past it is replaced by CAPACITY with "
        "`busy: true` (a reply to a connection with nothing unread is always sent)."))] = 64 << 20
    max_total_history_tokens: Annotated[int, Meta(ge=1, le=U32_MAX, description=(
        "Tokens kept over all context histories; past it the least recently used contexts are evicted (about "
        "40 bytes a token)."))] = 1 << 24
    max_history_tokens: Annotated[U32 | None, Meta(description=(
        "Longest history kept per context; positions past it are refused with OUT_OF_RANGE (it clamps "
        "`max_model_len`)."))] = None
    max_frame_bytes: Annotated[int, Meta(ge=1024, le=1 << 30, description=(
        "Largest request frame decoded; bigger ones get BAD_FRAME."))] = 64 << 20
    busy_poll_us: Annotated[int, Meta(ge=0, le=100_000, description=(
        "After each reply the socket is polled without sleeping for this long, since the host's next request "
        "usually follows within microseconds (a sleep and wake-up costs 100-300 us). 0 turns it off."))] = 200
    rehearse_steps: Annotated[bool, Meta(description=(
        "After a decode step's reply, while the host prepares the next step, run the driver's side of that step "
        "again on its frame with nothing changed (decode, a read-only plan, the reply's encoding). The engine "
        "call between two steps evicts that code and data from the CPU's caches; rehearsed, the next step's "
        "decode and plan run warm. Skipped when the next request has already arrived; it pays when the host "
        "takes longer between steps than the rehearsal does."))] = False
    stage_times: Annotated[bool, Meta(description=(
        "Time each forward's stages inside the driver (decode, plan, engine, finish, encode, send, and the wait "
        "for the next forward) and report their totals in `stats.stages`; for profiling, about 1 us a forward."
        ))] = False
    stream_socket: Annotated[bool, Meta(description=(
        "Also serve the protocol on a Unix stream socket (length-prefixed messages, no I/O threads: the lowest "
        "latency a polling host can get), in a private directory, for processes of the driver's own user; "
        "announced as `stream_endpoint` in the first handshake line. Not with CURVE."))] = False
    engine_step_timeout_s: Annotated[float, Meta(ge=0.0, le=86400.0, description=(
        "Deadline of one engine call; past it the forward's requests get ENGINE_ERROR and the engine is fenced "
        "off (health `degraded`) until the call returns. 0 waits forever; a deadline acts no sooner than 10 ms "
        "after the call starts."))] = 300.0
    curve_secret_key_file: Annotated[str | None, Meta(description=(
        "File (mode 0600) holding the server's Z85 CURVE secret key: encrypts the socket and allows a `tcp://` "
        "bind beyond loopback. Hosts connect with the matching public key."))] = None
    curve_client_keys_file: Annotated[str | None, Meta(description=(
        "With CURVE: file of allowed client public keys (Z85, one per line); unset admits any client that knows "
        "the server's public key."))] = None
    venv: Annotated[str | None, Meta(description=(
        "Interpreter override; read by the host, ignored by the driver."))] = None
    python: Annotated[str | None, Meta(description=(
        "Interpreter override; read by the host, ignored by the driver."))] = None


class ModelSection(Struct, forbid_unknown_fields=True):
    """`[model]`."""

    snapshot_dir: Annotated[str, Meta(min_length=1, description=(
        "A local Hugging Face checkpoint directory (config.json and weights)."))]
    name: Annotated[str, Meta(description=(
        "Model name reported in the handshake (default: the directory name)."))] = ""
    hf_repo: Annotated[str, Meta(description="Hugging Face repository id, informational.")] = ""


class DriverSection(Struct, forbid_unknown_fields=True):
    """`[driver]`."""

    device: Annotated[list[Annotated[str, Meta(pattern=DEVICE)]], Meta(min_length=1, description=(
        "Devices, each `cpu`, `cuda` or `cuda:N`: one runs the engine in the driver process, several run one "
        "data-parallel replica subprocess each."))] = field(default_factory=lambda: ["cuda:0"])
    group_id: Annotated[int, Meta(ge=0, le=2**63 - 1, description="Group id echoed in the handshake line.")] = 0
    activation_dtype: Annotated[Dtype, Meta(description=(
        "Activation dtype; the reference engine resolves `auto` to bfloat16 on CUDA and float32 on CPU."))] \
        = "bfloat16"
    # msgspec takes integer bounds up to int64 only: this one is checked in parse_config.
    random_seed: Annotated[Annotated[int, Meta(ge=0, extra={"le": SEED_MAX})] | None, Meta(description=(
        "Seed of the driver's own randomness (unseeded samplers); unset draws from the OS. With several "
        "devices, replica i uses this plus i."))] = None
    tensor_parallel_size: Annotated[Literal[1], Meta(description=(
        "Must be 1: use several devices for data parallelism."))] = 1
    type: Annotated[EngineName, Meta(description="Driver type as written by the host.")] = "tensorrt_llm"


class _DriverTable(DriverSection, forbid_unknown_fields=True):
    """`[driver]` as written, holding `[driver.options]`."""

    options: DriverOptions = field(default_factory=DriverOptions)


class _StartupFile(Struct, forbid_unknown_fields=True):
    """The whole document: msgspec names a bad value's path in it (`$.driver.options.lookahead_tokens`)."""

    model: ModelSection
    driver: _DriverTable = field(default_factory=_DriverTable)


@dataclass
class DriverConfig:
    model: ModelSection
    driver: DriverSection
    options: DriverOptions

    @property
    def engine(self) -> str:
        return ENGINE_ALIASES[self.options.engine]


def parse_config(data: dict[str, Any], base_dir: Path | None = None) -> DriverConfig:
    """Build a DriverConfig from a parsed TOML document."""
    try:
        document = msgspec.convert(data, _StartupFile, strict=True)
    except msgspec.ValidationError as exc:
        raise StartupError(f"config: {explain(exc, data, _StartupFile)}") from None
    model, table = document.model, document.driver
    options = table.options
    driver = DriverSection(**{name: getattr(table, name) for name in DriverSection.__struct_fields__})

    # What msgspec cannot say: a bound past int64, a key it would not name, and rules across keys.
    if driver.random_seed is not None and driver.random_seed > SEED_MAX:
        raise StartupError(f"config: driver.random_seed = {driver.random_seed} is out of range; expected 0..{SEED_MAX}")
    snapshot = Path(os.path.expanduser(model.snapshot_dir))
    if not snapshot.is_absolute() and base_dir is not None:
        snapshot = base_dir / snapshot
    model.snapshot_dir = str(snapshot)
    if not model.name:
        model.name = snapshot.name
    for key in options.llm_kwargs:  # a key pattern fails at msgspec's `key in $...llm_kwargs`, not naming it
        if not key.isidentifier():
            raise StartupError(f"config: driver.options.llm_kwargs key {key!r} is not a Python identifier")
    kv_table = options.llm_kwargs.get("kv_cache_config")
    fraction = kv_table.get("free_gpu_memory_fraction") if isinstance(kv_table, dict) else None
    if isinstance(fraction, int | float) and fraction >= 1.0:  # TensorRT-LLM asserts it when sizing the cache
        raise StartupError(f"config: driver.options.llm_kwargs.kv_cache_config.free_gpu_memory_fraction = {fraction} "
                           "must be smaller than 1.0")
    if options.trust_remote_code is None:  # TensorRT-LLM documents true as its default; the reference does not need it
        options.trust_remote_code = ENGINE_ALIASES[options.engine] == "tensorrt_llm"
    if options.execution_mode == "pyexecutor" and options.max_history_tokens is not None:
        raise StartupError("config: driver.options.max_history_tokens must be unset with execution_mode = "
                           "\"pyexecutor\" (the executor needs full histories)")
    if options.rl_ops and options.execution_mode == "pyexecutor":
        raise StartupError("config: driver.options.rl_ops needs execution_mode = \"generate\" (TensorRT-LLM "
                           "1.2 offers sleep and weight updates only through its Ray orchestrator)")
    if options.stream_socket and options.curve_secret_key_file is not None:
        raise StartupError("config: driver.options.stream_socket serves without CURVE; it cannot be combined with "
                           "curve_secret_key_file (leave one of them out)")
    if options.curve_client_keys_file is not None and options.curve_secret_key_file is None:
        raise StartupError("config: driver.options.curve_client_keys_file needs curve_secret_key_file as well")
    for key in ("curve_secret_key_file", "curve_client_keys_file"):
        value = getattr(options, key)
        if value is not None:  # like snapshot_dir: ~ expanded, relative to the TOML file's directory
            path = Path(os.path.expanduser(value))
            setattr(options, key, str(base_dir / path if not path.is_absolute() and base_dir else path))
    return DriverConfig(model=model, driver=driver, options=options)


def load_config(path: str | Path) -> DriverConfig:
    """Read and check the startup TOML file."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StartupError(f"config: {path} is not valid TOML: {exc}") from None
    if is_pie_config(data):
        raise StartupError(f"config: {pie_config_message(path)}")
    return parse_config(data, base_dir=path.parent)


def is_pie_config(data: dict[str, Any]) -> bool:
    """A full Pie config (`[[model]]` entries), which a host reads, not the driver."""
    return isinstance(data.get("model"), list)


def pie_config_message(path: str | Path) -> str:
    """What to say when a Pie config is given where the driver's startup file belongs."""
    return (f"{path} is a Pie config ([[model]] entries); the driver and `serve` take the driver startup TOML "
            "Pie writes for one model ([model] + [driver]): start Pie with this file instead, or check it with "
            f"`pie-driver-trtllm validate {path}`")


def option_table_markdown() -> str:
    """The key table of docs/configuration.md, generated from the Structs."""
    rows = ["| key | default | type | allowed | meaning |", "|---|---|---|---|---|"]
    for cls, section in ((ModelSection, "model"), (DriverSection, "driver"), (DriverOptions, "driver.options")):
        rows += table_rows(cls, section)
    return "\n".join(rows) + "\n"
