"""Startup configuration: the one typed source of truth for every key the driver reads.

The host writes a TOML file with `[model]`, `[driver]` and `[driver.options]`. Each key is a dataclass
field below whose metadata holds its documentation and its rule; `load_config` checks every key once and
fails with a single line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli keeps older interpreters working
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10 and older
    import tomli as tomllib

ENGINE_ALIASES = {"tensorrt_llm": "tensorrt_llm", "tensorrt-llm": "tensorrt_llm", "trtllm": "tensorrt_llm",
                  "reference": "reference"}
DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float")
MAX_LOOKAHEAD = 16
U32_MAX = 2**32 - 1


class StartupError(Exception):
    """A problem that stops the driver before it is ready; its text is the one line printed to stderr."""


def opt(default: Any, doc: str, kinds: tuple[type, ...], *, choices: tuple[Any, ...] = (),
        minimum: float | None = None, maximum: float | None = None, nullable: bool = False) -> Any:
    """A config field: default, one-line doc, accepted TOML types and the allowed values."""
    meta = {"doc": doc, "kinds": kinds, "choices": choices, "minimum": minimum, "maximum": maximum,
            "nullable": nullable}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DriverOptions:
    """`[driver.options]`: the user's `[model.driver.options]` table."""

    engine: str = opt("tensorrt_llm", "Engine: `tensorrt_llm` (aliases `tensorrt-llm`, `trtllm`) or "
                      "`reference` (PyTorch + transformers).", (str,), choices=tuple(ENGINE_ALIASES))
    lookahead_tokens: int = opt(16, "Greedy tokens generated per engine call and served one per host step; "
                                "1 turns lookahead off.", (int,), minimum=1, maximum=MAX_LOOKAHEAD)
    execution_mode: str = opt("generate", "TensorRT-LLM path: public `LLM.generate` or the experimental "
                              "private `pyexecutor` loop.", (str,), choices=("generate", "pyexecutor"))
    trust_remote_code: bool | None = opt(
        None, "Run a checkpoint's own Python code (`auto_map`) at load. Unset: false for the reference engine, "
        "true for TensorRT-LLM (its documented default; a warning says so).", (bool,), nullable=True)
    skip_tokenizer_init: bool = opt(True, "Passed to `tensorrt_llm.LLM`; the host sends token ids.", (bool,))
    backend: str | None = opt(None, "TensorRT-LLM backend override.", (str,), nullable=True)
    attn_backend: str | None = opt(None, "TensorRT-LLM attention backend override.", (str,), nullable=True)
    enable_chunked_prefill: bool | None = opt(None, "TensorRT-LLM chunked prefill.", (bool,), nullable=True)
    max_seq_len: int | None = opt(None, "Runtime sequence cap; also clamps `max_model_len`.", (int,),
                                  minimum=1, maximum=U32_MAX, nullable=True)
    max_batch_size: int | None = opt(None, "TensorRT-LLM runtime batch-size cap.", (int,), minimum=1,
                                     maximum=1 << 20, nullable=True)
    max_num_tokens: int | None = opt(None, "TensorRT-LLM runtime token cap.", (int,), minimum=1, maximum=1 << 24,
                                     nullable=True)
    kv_cache_free_gpu_memory_fraction: float | None = opt(
        None, "Fraction of free GPU memory TensorRT-LLM gives its KV cache; must be below 1.0.", (float, int),
        minimum=0.01, maximum=1.0, nullable=True)
    llm_kwargs: dict = opt({}, "Passed through to `tensorrt_llm.LLM(...)`; wins over curated keys.", (dict,))  # noqa: RUF009
    pyexecutor_max_tokens: int = opt(4096, "Continuation window of one private executor request.", (int,),
                                     minimum=1, maximum=1 << 20)
    pyexecutor_worker_stop_timeout_s: float = opt(30.0, "Join timeout when stopping TensorRT-LLM's worker.",
                                                  (float, int), minimum=0.0, maximum=3600.0)
    enable_cache_salt: bool = opt(True, "Give each context its own TensorRT-LLM cache salt.", (bool,))
    reference_compile: bool = opt(True, "Reference engine on CUDA: `torch.compile` the per-layer elementwise "
                                  "work of the captured decode step (about 10% faster; the first step of each "
                                  "batch size compiles for a second or two).", (bool,))
    reference_overlap: bool = opt(True, "Reference engine on CUDA: when a step repeats the decode step the "
                                  "previous one predicted (each context fed the token it was given), launch the "
                                  "next predicted step before replying, so the GPU works while the reply travels; "
                                  "a step that differs discards it.", (bool,))
    max_concurrent_requests: int = opt(128, "Advertised and enforced `max_forward_requests`.", (int,), minimum=1,
                                       maximum=1 << 16)
    max_batched_tokens: int = opt(8192, "Advertised and enforced `max_forward_tokens`; also the advertised "
                                  "`max_logit_rows` and `max_prob_rows` (enforced: `logprobs` and `dist` samplers "
                                  "per forward).", (int,), minimum=1, maximum=1 << 20)
    max_sampler_rows: int = opt(8192, "Advertised and enforced `max_sampler_rows`: samplers of every type in one "
                                "forward.", (int,), minimum=1, maximum=1 << 20)
    max_output_elements: int = opt(1 << 20, "Advertised and enforced `max_output_elements`: the sum of `dist` "
                                   "`k` and of `logprobs` `token_ids` counts in one forward (about 14 bytes of "
                                   "reply each).", (int,), minimum=1, maximum=1 << 24)
    virtual_kv_page_size: int = opt(16, "Advertised (virtual) `kv_page_size`.", (int,), minimum=1,
                                    maximum=1 << 16)
    virtual_total_pages: int = opt(65536, "Advertised (virtual) `total_pages` and `max_page_refs`.", (int,),
                                   minimum=1, maximum=U32_MAX)
    max_logprob_labels: int = opt(1024, "Most `token_ids` of one `logprobs` sampler.",
                                  (int,), minimum=0, maximum=1 << 20)
    max_session_histories: int = opt(65536, "Context histories kept; the least recently used is evicted.",
                                     (int,), minimum=1, maximum=1 << 24)
    max_queued_requests: int = opt(256, "State ops held waiting behind the running one (all connections); more "
                                    "get CAPACITY with `busy: true`.", (int,), minimum=1, maximum=1 << 20)
    max_queued_bytes: int = opt(64 << 20, "Frame bytes of the state ops held waiting; past it a frame gets CAPACITY "
                                "with `busy: true`.", (int,), minimum=1024, maximum=1 << 34)
    max_total_history_tokens: int = opt(1 << 24, "Tokens kept over all context histories; past it the least "
                                        "recently used contexts are evicted (about 40 bytes a token).", (int,),
                                        minimum=1, maximum=U32_MAX)
    max_history_tokens: int | None = opt(None, "Longest history kept per context; positions past it are "
                                         "refused with OUT_OF_RANGE (it clamps `max_model_len`).", (int,),
                                         minimum=1, maximum=U32_MAX, nullable=True)
    max_frame_bytes: int = opt(64 << 20, "Largest request frame decoded; bigger ones get BAD_FRAME.", (int,),
                               minimum=1024, maximum=1 << 30)
    busy_poll_us: int = opt(
        200, "After each reply the socket is polled without sleeping for this long, since the host's next "
        "request usually follows within microseconds (a sleep and wake-up costs 100-300 us). 0 turns it off.",
        (int,), minimum=0, maximum=100_000)
    engine_step_timeout_s: float = opt(
        300.0, "Deadline of one engine call; past it the forward's requests get ENGINE_ERROR and the engine "
        "is fenced off (health `degraded`) until the call returns. 0 waits forever; a deadline acts no sooner "
        "than 10 ms after the call starts.", (float, int),
        minimum=0.0, maximum=86400.0)
    curve_secret_key_file: str | None = opt(
        None, "File (mode 0600) holding the server's Z85 CURVE secret key: encrypts the socket and allows a "
        "`tcp://` bind beyond loopback. Hosts connect with the matching public key.", (str,), nullable=True)
    curve_client_keys_file: str | None = opt(
        None, "With CURVE: file of allowed client public keys (Z85, one per line); unset admits any client "
        "that knows the server's public key.", (str,), nullable=True)
    venv: str | None = opt(None, "Interpreter override; read by the host, ignored by the driver.", (str,),
                           nullable=True)
    python: str | None = opt(None, "Interpreter override; read by the host, ignored by the driver.", (str,),
                             nullable=True)


@dataclass
class ModelSection:
    """`[model]`."""

    snapshot_dir: str = opt("", "Local Hugging Face checkpoint directory (config.json and weights).", (str,))
    name: str = opt("", "Model name reported in the handshake (default: the directory name).", (str,))
    hf_repo: str = opt("", "Hugging Face repository id, informational.", (str,))


@dataclass
class DriverSection:
    """`[driver]`."""

    device: list = opt(["cuda:0"], "Devices, each `cpu`, `cuda` or `cuda:N`: one runs the engine in the driver "  # noqa: RUF009
                       "process, several run one data-parallel replica subprocess each.", (list,))
    group_id: int = opt(0, "Group id echoed in the handshake line.", (int,), minimum=0, maximum=2**63 - 1)
    activation_dtype: str = opt("bfloat16", "Activation dtype; the reference engine resolves `auto` to "
                                "bfloat16 on CUDA and float32 on CPU.", (str,), choices=DTYPES)
    random_seed: int | None = opt(None, "Seed of the driver's own randomness (unseeded samplers); "
                                  "unset draws from the OS.", (int,), minimum=0, maximum=2**64 - 1, nullable=True)
    tensor_parallel_size: int = opt(1, "Must be 1: use several devices for data parallelism.", (int,),
                                    choices=(1,))
    type: str = opt("tensorrt_llm", "Driver type as written by the host.", (str,), choices=tuple(ENGINE_ALIASES))


@dataclass
class DriverConfig:
    model: ModelSection
    driver: DriverSection
    options: DriverOptions

    @property
    def engine(self) -> str:
        return ENGINE_ALIASES[self.options.engine]


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def _check(section: str, key: str, value: Any, meta: dict[str, Any]) -> Any:
    name = f"{section}.{key}"
    if value is None:
        if meta["nullable"]:
            return None
        raise StartupError(f"config: {name} = null is not allowed; expected {_kinds(meta)}")
    kinds: tuple[type, ...] = meta["kinds"]
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise StartupError(f"config: {name} = {value!r} has type {type(value).__name__}; expected {_kinds(meta)}")
    if meta["choices"] and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise StartupError(f"config: {name} = {value!r} is not allowed; expected one of {allowed}")
    if isinstance(value, float) and not math.isfinite(value):
        raise StartupError(f"config: {name} = {value!r} is not a finite number")
    lo, hi = meta["minimum"], meta["maximum"]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise StartupError(f"config: {name} = {value!r} is out of range; expected {bounds}")
    if isinstance(value, float) or float in kinds:
        return float(value)
    return value


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _kinds(meta: dict[str, Any]) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    kinds = [k for k in meta["kinds"] if not (k is int and float in meta["kinds"])]  # a number takes ints
    text = " or ".join(dict.fromkeys(names[k] for k in kinds))
    return text + (" or unset" if meta["nullable"] else "")


def build_section(cls: type, section: str, table: Any) -> Any:
    """Check one TOML table against the dataclass `cls`, refusing unknown keys."""
    if not isinstance(table, dict):
        raise StartupError(f"config: [{section}] must be a table, got {type(table).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise StartupError(f"config: unknown key {section}.{unknown[0]}; allowed keys: {', '.join(sorted(known))}")
    values = {}
    for name, f in known.items():
        if name in table:
            values[name] = _check(section, name, table[name], dict(f.metadata))
        elif f.default is MISSING and f.default_factory is MISSING:  # pragma: no cover - every field has one
            raise StartupError(f"config: {section}.{name} is required")
    return cls(**values)


def parse_config(data: dict[str, Any], base_dir: Path | None = None) -> DriverConfig:
    """Build a DriverConfig from a parsed TOML document."""
    unknown = sorted(set(data) - {"model", "driver"})
    if unknown:
        raise StartupError(f"config: unknown table [{unknown[0]}]; allowed tables: [model], [driver]")
    driver_table = data.get("driver", {})
    if not isinstance(driver_table, dict):
        raise StartupError(f"config: [driver] must be a table, got {type(driver_table).__name__}")
    driver_table = dict(driver_table)
    options_table = driver_table.pop("options", {})
    model = build_section(ModelSection, "model", data.get("model", {}))
    driver = build_section(DriverSection, "driver", driver_table)
    options = build_section(DriverOptions, "driver.options", options_table)

    if not model.snapshot_dir:
        raise StartupError("config: model.snapshot_dir is required (a local Hugging Face checkpoint directory)")
    snapshot = Path(os.path.expanduser(model.snapshot_dir))
    if not snapshot.is_absolute() and base_dir is not None:
        snapshot = base_dir / snapshot
    model.snapshot_dir = str(snapshot)
    if not model.name:
        model.name = snapshot.name
    if not driver.device:
        raise StartupError("config: driver.device = [] is empty; list at least one device such as \"cpu\"")
    for dev in driver.device:
        if not isinstance(dev, str) or not _DEVICE.match(dev):
            raise StartupError(f"config: driver.device entry {dev!r} is not allowed; expected \"cpu\", "
                               "\"cuda\" or \"cuda:N\"")
    for key, value in options.llm_kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise StartupError(f"config: driver.options.llm_kwargs key {key!r} is not a Python identifier")
        del value
    kv_table = options.llm_kwargs.get("kv_cache_config")
    for name, fraction in (("kv_cache_free_gpu_memory_fraction", options.kv_cache_free_gpu_memory_fraction),
                           ("llm_kwargs.kv_cache_config.free_gpu_memory_fraction",
                            kv_table.get("free_gpu_memory_fraction") if isinstance(kv_table, dict) else None)):
        if isinstance(fraction, int | float) and fraction >= 1.0:  # TensorRT-LLM asserts it when sizing the cache
            raise StartupError(f"config: driver.options.{name} = {fraction} must be smaller than 1.0")
    if options.trust_remote_code is None:  # TensorRT-LLM documents true as its default; the reference does not need it
        options.trust_remote_code = ENGINE_ALIASES[options.engine] == "tensorrt_llm"
    if options.execution_mode == "pyexecutor" and options.max_history_tokens is not None:
        raise StartupError("config: driver.options.max_history_tokens must be unset with execution_mode = "
                           "\"pyexecutor\" (the executor needs full histories)")
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
    """The `[driver.options]` table of docs/configuration.md, generated from the dataclass."""
    rows = ["| key | default | type | allowed | meaning |", "|---|---|---|---|---|"]
    for cls, section in ((ModelSection, "model"), (DriverSection, "driver"), (DriverOptions, "driver.options")):
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            shown = "unset" if default is None else _toml(default)
            meta = dict(f.metadata)
            rows.append(f"| `{section}.{f.name}` | `{shown}` | {_kinds(meta)} | {_allowed(meta)} | {meta['doc']} |")
    return "\n".join(rows) + "\n"


def _allowed(meta: dict[str, Any]) -> str:
    """The rule `_check` applies beyond the type, as the table shows it."""
    if meta["choices"]:
        return ", ".join(f"`{_toml(c)}`" for c in meta["choices"])
    lo, hi = meta["minimum"], meta["maximum"]
    if lo is not None and hi is not None:
        return f"{lo:g} to {hi:g}"
    if lo is not None:
        return f"at least {lo:g}"
    return f"at most {hi:g}" if hi is not None else ""
