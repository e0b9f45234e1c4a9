"""A Llama-architecture decoder (also Qwen2 and Mistral) over a flat token batch.

Every linear layer runs once over all tokens of the batch ([num_tokens, hidden]),
whatever mix of prefill chunks and decode steps they come from; only attention looks
at request boundaries (see `engine.attention`). q/k/v and gate/up projections are
fused into one matmul each; `engine.loader` concatenates the HF weights to match.

Parameter names, relative to this module:
    embed_tokens.weight, norm.weight, lm_head.weight (absent when tied),
    layers.{i}.input_layernorm.weight, layers.{i}.post_attention_layernorm.weight,
    layers.{i}.self_attn.qkv_proj.{weight,bias}, layers.{i}.self_attn.o_proj.{weight,bias},
    layers.{i}.mlp.gate_up_proj.weight, layers.{i}.mlp.down_proj.weight
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, attend
from engine.config import ModelConfig
from engine.kv_cache import KVPool
from engine.rope import apply_rope, inv_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype (as HF does).
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.qkv_proj = nn.Linear(
            config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.attention_out_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_pool: KVPool,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(num_tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(num_tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        kv_pool.write(self.layer_id, meta.new_slots, k, v)
        out = attend(q, kv_pool.kv_buffer[self.layer_id], meta)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_id)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_pool: KVPool,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_pool)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # Not a parameter: derived from the config, recomputed after `to_empty`.
        self.register_buffer("inv_freq", inv_frequencies(config), persistent=False)

    def tie_weights(self) -> None:
        """Re-point lm_head at the embedding; call again after `to_empty` (it unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_rope(self) -> None:
        self.inv_freq = inv_frequencies(self.config).to(self.embed_tokens.weight.device)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_pool: KVPool
    ) -> torch.Tensor:
        """Hidden states after the final norm, [num_tokens, hidden_size]. The batch's
        new k/v are written into `kv_pool` at `meta.new_slots` as a side effect."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, meta.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, meta, kv_pool)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits for the given rows (the runner passes only rows it samples)."""
        return self.lm_head(hidden).to(torch.float32)
