"""A batched decoder for Llama-family checkpoints over a static, slot-based KV cache.

It reuses the Hugging Face model's own weights (projections, norms, MLP, rotary tables) and replaces
only the per-sequence cache and the attention, so that one decode step runs every active context in one
batch and, on CUDA, as one captured graph per (batch-size bucket, attention window). Each context owns a
slot: row `s` of every layer's cache. Rows of a bucket that are idle this step write into a reserved
scratch column, so the captured graph never depends on which contexts happen to be active.

A decode step launches few kernels per layer (the layer math is in `llama_layers`): keys and values
go into the cache with one scatter, and grouped query heads attend as extra query rows of their key head
(so the fused attention kernels apply, with no repeated keys). The greedy token of every row is taken
inside the graph, so a greedy step moves only token ids to the host.

On CUDA the per-layer elementwise work (norms, rotary embedding, SiLU) also goes through `torch.compile`
before a graph is captured, which fuses it into fewer kernels (a second or a few per batch bucket, once
per process); the option `reference_compile = false` turns that off, and a failure to compile falls back
to the plain path with a one-line warning. Prefill and CPU runs always take the plain path.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from pie_driver_trtllm.engines.reference.llama_layers import (
    PLAIN_LAYER_FNS,
    add_linear,
    compiled_layer_fns,
    fuse_layer_weights,
    norm_eps,
    split_attention,
)

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_WINDOW = 128
PREFILL_BATCH_TOKENS = 8192  # the most (rows x chunk tokens) one batched prefill runs
# A decode step of few (row, key head) pairs over a long window: attention as GEMMs (split_attention).
SPLIT_ATTENTION_HEADS = 32
SPLIT_ATTENTION_WINDOW = 1024


def slot_bytes(model: Any, max_len: int) -> int:
    """Cache bytes one context slot takes (keys and values of every layer)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * len(model.model.layers) * config.num_key_value_heads * (max_len + 1) * head_dim * itemsize


def supports(model: Any) -> bool:
    config = model.config
    return (type(model).__name__ in SUPPORTED and not getattr(config, "sliding_window", None)
            and all(hasattr(layer.self_attn, "q_proj") and hasattr(layer.mlp, "gate_proj")
                    for layer in model.model.layers))


class DecodeOutput:
    """One decode step's results for its rows; valid until the decoder's next call."""

    __slots__ = ("_logits", "_slots", "_tokens")

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, slots: list[int]) -> None:
        self._logits, self._tokens, self._slots = logits, tokens, slots

    def tokens(self) -> list[int]:
        """The greedy (argmax) token of each row: one small device-to-host copy."""
        values = self._tokens.tolist()
        return [values[s] for s in self._slots]

    def logits(self) -> torch.Tensor:
        """Float32 logits [rows, vocab]."""
        return self._logits[self._slots].float()

    def for_slots(self, slots: list[int]) -> DecodeOutput:
        """The same step's results for these slots, in this order."""
        return DecodeOutput(self._logits, self._tokens, slots)


class BatchedLlama:
    def __init__(self, model: Any, slots: int, max_len: int, device: str, graphs: bool,
                 compile: bool = True) -> None:
        config = model.config
        self.model = model
        self.slots = slots
        self.max_len = max_len + 1          # the last column is the scratch column of idle rows
        self.scratch = max_len
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden_size = config.hidden_size
        self.scale = self.head_dim ** -0.5
        self.device = torch.device(device)
        dtype = next(model.parameters()).dtype
        self.dtype = dtype
        layers = len(model.model.layers)
        # One buffer per layer holds keys and values ([slot, k|v, head, column, dim]), so a step writes
        # both with one scatter; `k` and `v` are views of it.
        self._layer_count = layers
        self.new_cache()
        positions = torch.arange(self.max_len, device=self.device)[None]
        probe = torch.zeros(1, 1, config.hidden_size, dtype=dtype, device=self.device)
        cos, sin = model.model.rotary_emb(probe, positions)
        half = self.head_dim // 2
        self.cos = cos[0].to(dtype)                                               # [max_len, head_dim]
        # rotate_half(x) * sin == swap_halves(x) * (sin with its first half negated)
        self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).to(dtype)
        self.columns = torch.arange(self.max_len, device=self.device)
        self._mask_values = (torch.zeros((), dtype=dtype, device=self.device),
                             torch.full((), float("-inf"), dtype=dtype, device=self.device))
        self._fuse()
        self.use_graphs = graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None
        self._plain = PLAIN_LAYER_FNS
        self._step_fns = self._plain
        if compile and self.use_graphs and getattr(config, "hidden_act", "silu") == "silu":
            self._step_fns = compiled_layer_fns()

    # ------------------------------------------------------------------ memory and weights

    def new_cache(self) -> None:
        """A zeroed KV cache for every slot."""
        shape = (self.slots, 2, self.kv_heads, self.max_len, self.head_dim)
        self.cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self._layer_count)]
        self.k = [cache[:, 0] for cache in self.cache]
        self.v = [cache[:, 1] for cache in self.cache]

    def free_cache(self) -> None:
        """Let the KV cache go, and the graphs captured on it (with their memory pool)."""
        self.cache, self.k, self.v = [], [], []
        self._graphs.clear()
        self._pool = None

    def weights_to(self, device: torch.device | str) -> None:
        """Move the model's weights (host memory for a deep sleep, back to the device on waking); the fused
        weights are rebuilt where they land, and the graphs, captured on the old addresses, go."""
        self._layers_w = []
        self._final = None
        self._graphs.clear()
        self._pool = None
        self.model.to(device)
        if torch.device(device).type == self.device.type:
            self._fuse()

    def refill_fused(self) -> None:
        """After new weights were copied into the parameters: the fused weights view them, except the fused
        biases, which are copies."""
        with torch.no_grad():
            for layer, weights in zip(self.model.model.layers, self._layers_w, strict=True):
                attention, mlp = layer.self_attn, layer.mlp
                if weights.qkv_bias is not None:
                    torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias],
                              out=weights.qkv_bias)
                if weights.gate_up_bias is not None:
                    torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias], out=weights.gate_up_bias)

    def _fuse(self) -> None:
        model = self.model
        self._layers_w = [fuse_layer_weights(layer) for layer in model.model.layers]
        self._final = (model.model.norm.weight, norm_eps(model.model.norm))

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], start: int, wanted: list[int]) -> torch.Tensor:
        """Run `tokens` at positions start.. for one slot; float32 logits at the `wanted` offsets."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device)
        length = self._window(start + len(tokens))
        visible = (self.columns[None, :length] <= positions[:, None])  # causal over the slot's history
        hidden = self._layers(ids, positions[None], slot, visible[None], length, self._plain)
        return self.model.lm_head(hidden[0, wanted]).float()

    @torch.inference_mode()
    def prefill_many(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor | None:
        """Several slots' chunks (chunk i at positions starts[i]..) in one forward over the slot range they
        span; float32 logits of each chunk's last token. None when that range would waste over half its
        rows or exceed PREFILL_BATCH_TOKENS (the caller prefills one slot at a time then)."""
        first = min(slots)
        rows, steps = max(slots) - first + 1, max(len(chunk) for chunk in chunks)
        if 2 * len(slots) < rows or rows * steps > PREFILL_BATCH_TOKENS:
            return None
        ids = torch.zeros((rows, steps), dtype=torch.long)
        positions = torch.full((rows, steps), self.scratch, dtype=torch.long)  # padding writes the scratch column
        for slot, chunk, start in zip(slots, chunks, starts, strict=True):
            ids[slot - first, :len(chunk)] = torch.tensor(chunk)
            positions[slot - first, :len(chunk)] = torch.arange(start, start + len(chunk))
        ids, positions = ids.to(self.device), positions.to(self.device)
        length = self._window(max(start + len(chunk) for chunk, start in zip(chunks, starts, strict=True)))
        visible = self.columns[None, None, :length] <= positions[:, :, None]
        hidden = self._layers(ids, positions, first, visible, length, self._plain)
        rows_index = torch.tensor([slot - first for slot in slots], device=self.device)
        last = torch.tensor([len(chunk) - 1 for chunk in chunks], device=self.device)
        return self.model.lm_head(hidden[rows_index, last]).float()

    @torch.inference_mode()
    def run(self, slots: list[int], tokens: list[int], positions: list[int]) -> DecodeOutput:
        """One token for each (slot, token, position); the greedy tokens and the logits of the rows."""
        bucket = self._bucket(slots)
        length = self._window(max(positions) + 1)
        if self.use_graphs:
            graph = self._graphs.get((bucket, length)) or self._graph(bucket, length)
            graph.feed(slots, tokens, positions)
            graph.graph.replay()
            return DecodeOutput(graph.logits, graph.greedy, slots)
        token_buf = torch.zeros(bucket, dtype=torch.long)
        position_buf = torch.full((bucket,), self.scratch, dtype=torch.long)
        token_buf[slots] = torch.tensor(tokens)
        position_buf[slots] = torch.tensor(positions)
        logits, greedy = self._decode_rows(token_buf.to(self.device), position_buf.to(self.device), length)
        return DecodeOutput(logits, greedy, slots)

    @torch.inference_mode()
    def run_chain(self, slots: list[int], tokens: list[int], positions: list[int], passes: int) -> list[list[int]]:
        """Greedy decoding of several tokens per slot: pass j runs each slot at its position + j, fed the
        greedy token of pass j - 1 (pass 0: `tokens`). The greedy tokens of every pass, [passes][slots]. On
        CUDA the passes are queued back to back with the tokens kept on the device, and read once at the end."""
        if not self.use_graphs:
            out = []
            for j in range(passes):
                tokens = self.run(slots, tokens, [p + j for p in positions]).tokens()
                out.append(tokens)
            return out
        bucket = self._bucket(slots)
        made = torch.empty((passes, bucket), dtype=torch.long, device=self.device)
        for j in range(passes):
            at = [p + j for p in positions]
            length = self._window(max(at) + 1)
            graph = self._graphs.get((bucket, length)) or self._graph(bucket, length)
            graph.feed(slots, tokens, at)
            if j:  # the tokens staged above are pass 0's: overwritten, on the device, by pass j - 1's
                graph.inputs[0].copy_(made[j - 1])
            graph.graph.replay()
            made[j].copy_(graph.greedy)
        return made[:, slots].tolist()

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each (slot, token, position); float32 logits [len(slots), vocab]."""
        return self.run(slots, tokens, positions).logits()

    # ------------------------------------------------------------------ internals

    def _bucket(self, slots: list[int]) -> int:
        """The captured batch size that holds rows 0..max(slots)."""
        rows = max(slots) + 1
        return min(next((b for b in BUCKETS if b >= rows), rows), self.slots)

    def _window(self, end: int) -> int:
        """The attention window for columns [0, end): a power of two, not the whole cache. Few distinct
        windows mean few shapes: a decode graph per window, and the fused attention kernels' per-shape
        set-up (tens of ms for cuDNN's) paid once, not at every prefill length."""
        return min(self.max_len, max(MIN_WINDOW, 1 << (end - 1).bit_length()))

    def _decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, length: int,
                     fns: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        visible = self.columns[None, None, :length] <= positions[:, None, None]   # [bucket, 1, length]
        hidden = self._layers(tokens[:, None], positions[:, None], 0, visible, length, fns or self._plain)
        logits = self.model.lm_head(hidden[:, 0])
        return logits, logits.argmax(dim=-1)

    def _graph(self, bucket: int, length: int) -> _Graph:
        """The graph of (bucket, window). A bucket's first step captures it for every window, so that a
        context growing into the next window later does not stall a step of the whole batch."""
        try:
            self._capture_windows(bucket)
        except Exception as exc:
            if self._step_fns is self._plain:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"pie-driver-trtllm: torch.compile of the decode step failed ({type(exc).__name__}: "
                  f"{first[:200]}); running it uncompiled", file=sys.stderr, flush=True)
            self._step_fns = self._plain
            self._capture_windows(bucket)
        return self._graphs[(bucket, length)]

    def _capture_windows(self, bucket: int) -> None:
        end = MIN_WINDOW
        while True:
            window = self._window(end)
            if (bucket, window) not in self._graphs:
                self._capture(bucket, window)
            if window >= self.max_len - 1:
                return
            end = window + 1

    def _capture(self, bucket: int, length: int) -> _Graph:
        inputs = torch.zeros((2, bucket), dtype=torch.long, device=self.device)
        inputs[1] = self.scratch
        fns = self._step_fns
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels (and compile) and the allocator outside the capture
                self._decode_rows(inputs[0], inputs[1], length, fns)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, greedy = self._decode_rows(inputs[0], inputs[1], length, fns)
        self._pool = graph.pool()  # graphs share one memory pool: only one runs at a time
        entry = self._graphs[(bucket, length)] = _Graph(graph, inputs, logits, greedy, self.scratch)
        return entry

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, first: int, visible: torch.Tensor,
                length: int, fns: tuple[Any, Any, bool]) -> torch.Tensor:
        """ids/positions [rows, T] for slots first..first+rows; visible [rows, T, length] (True = may attend)."""
        pre, mlp, functional = fns
        rows, steps = ids.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        group = heads // kv_heads
        hidden = self.model.model.embed_tokens(ids).view(rows * steps, self.hidden_size)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [rows, T, 1, D]
        # An additive mask, made once for all layers; the query heads of one key head are extra query rows.
        bias = torch.where(visible, *self._mask_values)[:, None, None]
        bias = bias.expand(rows, 1, group, steps, length).reshape(rows, 1, group * steps, length)
        write = positions[:, None, None, :, None].expand(rows, 2, kv_heads, steps, dim)
        split = steps == 1 and rows * kv_heads <= SPLIT_ATTENTION_HEADS and length >= SPLIT_ATTENTION_WINDOW
        attention = split_attention if split else torch.nn.functional.scaled_dot_product_attention
        for index, weights in enumerate(self._layers_w):
            qkv = pre(hidden, weights.input_norm, weights.input_eps, weights.qkv, weights.qkv_bias,
                      cos, sin, rows, steps, heads + kv_heads, dim, functional)     # [rows, T, H+2KV, D]
            cache = self.cache[index][first:first + rows]      # the rows' cache slots: written in place
            cache.scatter_(3, write, qkv[:, :, heads:].unflatten(2, (2, kv_heads)).permute(0, 2, 3, 1, 4))
            q = qkv[:, :, :heads].unflatten(2, (kv_heads, group)).permute(0, 2, 3, 1, 4)
            # Strided views of the cache go straight into the fused attention kernel: no copies.
            out = attention(q.reshape(rows, kv_heads, group * steps, dim), cache[:, 0, :, :length],
                            cache[:, 1, :, :length], attn_mask=bias, scale=self.scale)
            out = out.unflatten(2, (group, steps)).permute(0, 3, 1, 2, 4).reshape(rows * steps, heads * dim)
            hidden = add_linear(hidden, out, weights.o, weights.o_bias)
            x = mlp(hidden, weights.post_norm, weights.post_eps, weights.gate_up, weights.gate_up_bias,
                    None if functional else weights.act)
            hidden = add_linear(hidden, x, weights.down, weights.down_bias)
        weight, eps = self._final  # type: ignore[misc]
        return torch.nn.functional.rms_norm(hidden, (self.hidden_size,), weight, eps).view(rows, steps, -1)


class _Graph:
    """A captured decode step with its device inputs and a pinned host staging buffer."""

    def __init__(self, graph: Any, inputs: torch.Tensor, logits: torch.Tensor, greedy: torch.Tensor,
                 scratch: int) -> None:
        self.graph, self.inputs, self.logits, self.greedy = graph, inputs, logits, greedy
        self.scratch = scratch
        self.host = torch.empty(inputs.shape, dtype=torch.long, pin_memory=True)
        self.staged = self.host.numpy()
        self.copied = torch.cuda.Event()
        self.copied.record()

    def feed(self, slots: list[int], tokens: list[int], positions: list[int]) -> None:
        """Tokens and positions of this step's rows into the graph's inputs, as one host-to-device copy."""
        self.copied.synchronize()  # the last copy out of the staging buffer has finished
        staged = self.staged
        staged[0] = 0
        staged[1] = self.scratch
        staged[0, slots] = tokens
        staged[1, slots] = positions
        self.inputs.copy_(self.host, non_blocking=True)
        self.copied.record()
