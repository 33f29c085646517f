"""The per-layer math of the batched Llama decoder: fused weights and the functions a layer runs.

q, k and v come from one GEMM and gate and up from another (`fuse_layer_weights`); the rotary embedding
turns q and k together; the residual adds ride on the output GEMMs (`add_linear`). On CUDA the
elementwise parts (`pre_attention`, `gated_mlp`) can go through `torch.compile` (`compiled_layer_fns`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, with q/k/v and gate/up fused."""

    input_norm: torch.Tensor
    input_eps: float
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    post_eps: float
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    act: Any


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Decode attention with one query row per head (`enable_gqa`): over a long window the grouped form
    gives each (row, key head) one thread block that walks the whole window, and its GEMM fallback picks
    a slow small-N kernel (3 ms a step at 8k); this form measured flat with history."""
    rows, kv_heads, group, dim = q.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(rows, kv_heads * group, 1, dim), k, v, attn_mask=attn_mask[:, :, :1], scale=scale,
        enable_gqa=True)
    return out.view(rows, kv_heads, group, dim)


def pre_attention(hidden: torch.Tensor, norm: torch.Tensor, eps: float, qkv_weight: torch.Tensor,
                  qkv_bias: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, rows: int, steps: int,
                  rotated: int, dim: int, functional: bool) -> torch.Tensor:
    """Norm, the q/k/v projection and the rotary embedding of q and k: [rows, T, H + 2 KV heads, D]."""
    x = torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), norm, eps)
    qkv = torch.nn.functional.linear(x, qkv_weight, qkv_bias).view(rows, steps, -1, dim)
    qk = qkv[:, :, :rotated]
    swapped = qk.unflatten(-1, (2, dim // 2)).flip(-2).flatten(-2)
    if functional:  # for torch.compile: one fused kernel writes the whole result
        return torch.cat((qk * cos + swapped * sin, qkv[:, :, rotated:]), dim=2)
    torch.addcmul(qk * cos, swapped, sin, out=qk)  # q and k turned together, in place
    return qkv


def gated_mlp(hidden: torch.Tensor, norm: torch.Tensor, eps: float, gate_up: torch.Tensor,
              gate_up_bias: torch.Tensor | None, act: Any) -> torch.Tensor:
    """Norm, the gate/up projection and the gated activation: the input of the down projection."""
    x = torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), norm, eps)
    gate, up = torch.nn.functional.linear(x, gate_up, gate_up_bias).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) if act is None else act(gate)) * up


def add_linear(hidden: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """hidden + linear(x): without a bias the add rides on the GEMM, in place (one kernel)."""
    if bias is not None:
        return hidden + torch.nn.functional.linear(x, weight, bias)
    return hidden.addmm_(x, weight.t())


_COMPILED: tuple[Any, Any, bool] | None = None


def compiled_layer_fns() -> tuple[Any, Any, bool]:
    """The per-layer elementwise work through torch.compile (compiled lazily, at a graph's warm-up); the
    attention, the cache write and the GEMMs that carry the residual adds stay as they are."""
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo

        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # one entry per batch bucket and dtype
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 64))
        _COMPILED = (torch.compile(pre_attention, fullgraph=True, dynamic=False),
                     torch.compile(gated_mlp, fullgraph=True, dynamic=False), True)
    return _COMPILED


def fuse_layer_weights(layer: Any) -> LayerWeights:
    """One GEMM for q, k and v and one for gate and up; the original modules then view the fused weights,
    so nothing is stored twice."""
    attention, mlp = layer.self_attn, layer.mlp
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    qkv = torch.cat([p.weight.data for p in projections]).contiguous()
    qkv_bias = torch.cat([p.bias.data for p in projections]) if attention.q_proj.bias is not None else None
    offset = 0
    for projection in projections:
        rows = projection.weight.shape[0]
        projection.weight.data = qkv[offset:offset + rows]
        offset += rows
    gate_up = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data]).contiguous()
    gate_up_bias = torch.cat([mlp.gate_proj.bias.data, mlp.up_proj.bias.data]) \
        if mlp.gate_proj.bias is not None else None
    half = mlp.gate_proj.weight.shape[0]
    mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up[:half], gate_up[half:]
    o, down = attention.o_proj, mlp.down_proj
    return LayerWeights(layer.input_layernorm.weight, norm_eps(layer.input_layernorm), qkv, qkv_bias,
                        o.weight, o.bias, layer.post_attention_layernorm.weight,
                        norm_eps(layer.post_attention_layernorm), gate_up, gate_up_bias, down.weight, down.bias,
                        mlp.act_fn)


def norm_eps(module: Any) -> float:
    return getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)


PLAIN_LAYER_FNS = (pre_attention, gated_mlp, False)  # (pre-attention, mlp, functional)
