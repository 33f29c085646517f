"""A batched decoder for Llama-family checkpoints over a static, slot-based KV cache.

It reuses the Hugging Face model's own modules (projections, norms, MLP, rotary tables) and replaces
only the per-sequence cache and the attention, so that one decode step runs every active context in one
batch and, on CUDA, as one captured graph per batch-size bucket. Each context owns a slot: row `s` of
every layer's cache. Rows of a bucket that are idle this step write into a reserved scratch column, so
the captured graph never depends on which contexts happen to be active.
"""

from __future__ import annotations

from typing import Any

import torch

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_WINDOW = 128


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


class BatchedLlama:
    def __init__(self, model: Any, slots: int, max_len: int, device: str, graphs: bool) -> None:
        config = model.config
        self.model = model
        self.slots = slots
        self.max_len = max_len + 1          # the last column is the scratch column of idle rows
        self.scratch = max_len
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.device = torch.device(device)
        dtype = next(model.parameters()).dtype
        shape = (slots, self.kv_heads, self.max_len, self.head_dim)
        layers = len(model.model.layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        positions = torch.arange(self.max_len, device=self.device)[None]
        probe = torch.zeros(1, 1, config.hidden_size, dtype=dtype, device=self.device)
        cos, sin = model.model.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)   # [max_len, head_dim]
        self.columns = torch.arange(self.max_len, device=self.device)
        self._fused = [_fuse(layer) for layer in model.model.layers]
        self.use_graphs = graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool: Any = None

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], start: int, wanted: list[int]) -> torch.Tensor:
        """Run `tokens` at positions start.. for one slot; float32 logits at the `wanted` offsets."""
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device)
        end = start + len(tokens)
        visible = (self.columns[None, :end] <= positions[:, None])  # causal over the slot's history
        hidden = self._layers(ids, positions[None], slot, visible[None], end)
        return self._logits(hidden[0, wanted])

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each (slot, token, position); float32 logits [len(slots), vocab]."""
        rows = max(slots) + 1
        bucket = min(next((b for b in BUCKETS if b >= rows), rows), self.slots)
        token_buf = torch.zeros(bucket, dtype=torch.long)
        position_buf = torch.full((bucket,), self.scratch, dtype=torch.long)
        token_buf[slots] = torch.tensor(tokens)
        position_buf[slots] = torch.tensor(positions)
        # Attend over a power-of-two window that covers every active row, not the whole cache.
        length = min(self.max_len, max(MIN_WINDOW, 1 << (max(positions)).bit_length()))
        if self.use_graphs:
            graph, token_in, position_in, logits_out = self._graph(bucket, length)
            token_in.copy_(token_buf, non_blocking=True)
            position_in.copy_(position_buf, non_blocking=True)
            graph.replay()
            return logits_out[slots]
        logits = self._decode_rows(token_buf.to(self.device), position_buf.to(self.device), length)
        return logits[slots]

    # ------------------------------------------------------------------ internals

    def _decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        visible = self.columns[None, :length] <= positions[:, None]   # [bucket, length]
        hidden = self._layers(tokens[:, None], positions[:, None], 0, visible[:, None], length)
        return self._logits(hidden[:, 0])

    def _graph(self, bucket: int, length: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (bucket, length)
        if key not in self._graphs:
            token_in = torch.zeros(bucket, dtype=torch.long, device=self.device)
            position_in = torch.full((bucket,), self.scratch, dtype=torch.long, device=self.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and allocator outside the capture
                    self._decode_rows(token_in, position_in, length)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits_out = self._decode_rows(token_in, position_in, length)
            self._pool = graph.pool()  # graphs share one memory pool: only one runs at a time
            self._graphs[key] = (graph, token_in, position_in, logits_out)
        return self._graphs[key]

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, first: int, visible: torch.Tensor,
                length: int) -> torch.Tensor:
        """ids/positions [rows, T] for slots first..first+rows; visible [rows, T, length] (True = may attend)."""
        rows, steps = ids.shape
        hidden = self.model.model.embed_tokens(ids)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]   # [rows, 1, T, D]
        mask = visible[:, None]                                                   # [rows, 1, T, length]
        linear = torch.nn.functional.linear
        for index, layer in enumerate(self.model.model.layers):
            qkv_weight, qkv_bias, gate_up_weight, split = self._fused[index]
            qkv = linear(_norm(layer.input_layernorm, hidden), qkv_weight, qkv_bias)
            q, k, v = qkv.split(split, dim=-1)
            q = q.view(rows, steps, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(rows, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(rows, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys = self.k[index][first:first + rows]      # views of the cache rows: written in place
            values = self.v[index][first:first + rows]
            write = positions[:, None, :, None].expand(rows, self.kv_heads, steps, self.head_dim)
            keys.scatter_(2, write, k)
            values.scatter_(2, write, v)
            # Strided views of the cache go straight into the fused attention kernel: no copies.
            out = torch.nn.functional.scaled_dot_product_attention(
                q, keys[:, :, :length], values[:, :, :length], attn_mask=mask, scale=self.scale,
                enable_gqa=self.heads != self.kv_heads)
            out = out.transpose(1, 2).reshape(rows, steps, -1)
            hidden = hidden + layer.self_attn.o_proj(out)
            gate, up = linear(_norm(layer.post_attention_layernorm, hidden), gate_up_weight).chunk(2, dim=-1)
            hidden = hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return _norm(self.model.model.norm, hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()


def _fuse(layer: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[int]]:
    """One GEMM for q, k and v and one for gate and up; the original modules then view the fused weights,
    so nothing is stored twice."""
    attention, mlp = layer.self_attn, layer.mlp
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    qkv = torch.cat([p.weight.data for p in projections]).contiguous()
    bias = torch.cat([p.bias.data for p in projections]) if attention.q_proj.bias is not None else None
    split = [p.weight.shape[0] for p in projections]
    offset = 0
    for projection, rows in zip(projections, split, strict=True):
        projection.weight.data = qkv[offset:offset + rows]
        offset += rows
    gate_up = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data]).contiguous()
    half = mlp.gate_proj.weight.shape[0]
    mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up[:half], gate_up[half:]
    return qkv, bias, gate_up, split


def _norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    # The Llama RMSNorm in float32, as transformers computes it, but as one fused kernel.
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    return module.weight * torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
