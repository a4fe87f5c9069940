"""CausalLM: embeddings, pre-norm blocks (token mixer + SwiGLU), final norm, LM head, loss, generation.

Packed training input is input_ids [1, T] with cu_seqlens int32 [N+1]; a padded batch [B, T] needs none.
Labels follow the Hugging Face convention (labels = input_ids, -100 = ignore) and are shifted inside
(`mom_train.loss.shift_labels`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mom_train.config import ModelConfig
from mom_train.kernels.cp import ContextParallel
from mom_train.loss import IGNORE_INDEX, lm_head_logits, lm_head_loss, shift_labels
from mom_train.model.attention import Attention
from mom_train.model.cache import Cache
from mom_train.model.gated_deltanet import GatedDeltaNet
from mom_train.model.linear import make_linear
from mom_train.model.mlp import SwiGLU, mlp_intermediate_size
from mom_train.model.norm import RMSNorm


@dataclass
class ModelOutput:
    """loss = loss_sum / num_valid + aux_loss_coef * aux_loss (None without labels); loss_sum fp32 scalar;
    num_valid long scalar; logits [B, T, vocab] (None when a fused loss skipped them); aux_loss: sum of
    the MoM router losses (0 for other archs, not multiplied by the coef); router_load [num_mom_layers, E]."""
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_valid: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: Cache | None = None
    router_load: torch.Tensor | None = None


def build_mixer(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The token mixer of one block, chosen by cfg.arch."""
    if cfg.arch == "mom":
        # imported here so the other archs work without the MoM layer
        from mom_train.model.mom import MoMAttention
        return MoMAttention(cfg, layer_idx)
    if cfg.arch == "gated_deltanet":
        return GatedDeltaNet(cfg, layer_idx)
    if cfg.arch == "transformer":
        return Attention(cfg, layer_idx)
    raise ValueError(f"model.arch={cfg.arch!r} is unknown; choose one of 'mom', 'gated_deltanet', 'transformer'")


class Block(nn.Module):
    """Pre-norm block over the residual stream r: r = r + mixer(norm(r)), then r = r + mlp(norm(r)).

    Written in the fused form: the block takes the previous branch output h and the stream r before it is
    added, and returns its own last branch output and the stream, so every add sits in the next norm's kernel:
        x, r = add_and_norm(h, r); h = mixer(x); x, r = add_and_norm(h, r); h = mlp(x).
    h, r [B, T, D]; r is None before the first block (h is then the embedding, which starts the stream).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, backend=cfg.kernel_backend)
        self.mixer = build_mixer(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, backend=cfg.kernel_backend)
        intermediate = mlp_intermediate_size(cfg.hidden_size, cfg.hidden_ratio, cfg.intermediate_size)
        self.mlp = SwiGLU(cfg.hidden_size, intermediate, cfg.init_std, backend=cfg.kernel_backend)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
                cache: object | None = None, use_cache: bool = False, context: ContextParallel | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, object | None, dict]:
        x, residual = self.attn_norm.add_and_norm(h, residual)
        h, new_cache, aux = self.mixer(x, cu_seqlens=cu_seqlens, cache=cache, use_cache=use_cache, context=context)
        x, residual = self.mlp_norm.add_and_norm(h, residual)
        return self.mlp(x), residual, new_cache, aux


class CausalLM(nn.Module):
    """Decoder-only language model over token ids; see `forward` and `generate`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, backend=cfg.kernel_backend)
        self.lm_head = None if cfg.tie_embeddings else make_linear(cfg.hidden_size, cfg.vocab_size, kind="column")
        # (hidden, head_weight, targets, fused) -> (loss_sum, logits | None) and (hidden, head_weight) -> logits:
        # the LM head's two uses, replaced under tensor parallelism (each rank scores its token shard)
        self.loss_fn = lm_head_loss
        self.logits_fn = lm_head_logits
        # recompute each block in backward to save activation memory (set by the trainer)
        self.activation_checkpointing = False
        self.reset_parameters()

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head weight [vocab, hidden] (the embedding when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def reset_parameters(self) -> None:
        """Initialise the parameters this module owns directly (blocks initialise themselves)."""
        nn.init.normal_(self.embed.weight, 0.0, self.config.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, self.config.init_std)

    def init_weights(self) -> None:
        """Re-initialise every parameter, e.g. after building on the meta device and `to_empty`.

        Children are reset before their parents, so a layer's own `reset_parameters` has the last word over
        the defaults of the nn.Linear / nn.Embedding it contains.
        """
        for module in reversed(list(self.modules())):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        context: ContextParallel | None = None,
    ) -> ModelOutput:
        """input_ids long [B, T], or packed [1, T] with cu_seqlens int32 [N+1]; labels long [B, T] (HF
        convention, shifted here); cache: continue from an earlier call (it is updated in place);
        use_cache: return the cache holding the state after these tokens.

        context: the inputs are this rank's contiguous part of a packed sequence split over a context-parallel
        group (the caller splits it); labels are then that part's already-shifted targets.
        Recurrent states and conv halos cross the ranks; loss_sum and num_valid count this rank's rows."""
        self._check_inputs(input_ids, cu_seqlens, labels)
        if use_cache and cache is None:
            cache = Cache(len(self.layers))
        h, residual = self.embed(input_ids), None
        aux_losses, loads = [], []
        for i, layer in enumerate(self.layers):
            state = cache[i] if cache is not None else None
            if self.activation_checkpointing and self.training and not use_cache:
                h, residual, new_state, aux = checkpoint(layer, h, residual, cu_seqlens, state, use_cache, context,
                                                         use_reentrant=False, preserve_rng_state=False)
            else:
                h, residual, new_state, aux = layer(h, residual, cu_seqlens, state, use_cache, context)
            if use_cache:
                cache[i] = new_state
            if "aux_loss" in aux:
                aux_losses.append(aux["aux_loss"])
                loads.append(aux["router_load"])
        hidden, _ = self.norm.add_and_norm(h, residual)
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else hidden.new_zeros((), dtype=torch.float32)
        out = ModelOutput(aux_loss=aux_loss, cache=cache if use_cache else None,
                          router_load=torch.stack(loads) if loads else None)
        if labels is None:
            out.logits = self.logits_fn(hidden, self.head_weight)
            return out
        targets = labels if context is not None else shift_labels(labels, cu_seqlens)
        # training needs no logits: the fused head + cross entropy never materialises them
        fused = hidden.is_cuda and self.training and self.config.kernel_backend != "torch"
        out.loss_sum, out.logits = self.loss_fn(hidden, self.head_weight, targets, fused)
        out.num_valid = (targets != IGNORE_INDEX).sum()
        out.loss = out.loss_sum / out.num_valid.clamp(min=1) + self.config.aux_loss_coef * aux_loss
        return out

    def _check_inputs(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None,
                      labels: torch.Tensor | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be long [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        if cu_seqlens is not None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"with cu_seqlens, input_ids must be packed as [1, T], got "
                                 f"{tuple(input_ids.shape)}; flatten the batch and give document starts")
            if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
                raise ValueError(f"cu_seqlens must be int32 [N+1] (0, ..., T), got {cu_seqlens.dtype} "
                                 f"{tuple(cu_seqlens.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)} (HF convention: labels = input_ids, -100 = ignore)")

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue prompts input_ids [B, T] by max_new_tokens -> [B, T + max_new_tokens] (greedy when
        temperature == 0). The prompt is prefilled in one forward, then one token per step with the cache.
        Rows that emitted eos_token_id keep emitting it."""
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"generate: need max_new_tokens >= 0, temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                             f"got {max_new_tokens}, {temperature}, {top_p}, {top_k}")
        B, T = input_ids.shape
        tokens = [input_ids]
        if max_new_tokens == 0:
            return input_ids
        out = self(input_ids, use_cache=True)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_ids = sample_next_token(out.logits[:, -1], temperature, top_p, top_k, generator)  # [B]
            if eos_token_id is not None:
                next_ids = next_ids.masked_fill(finished, eos_token_id)
                finished = finished | (next_ids == eos_token_id)
            tokens.append(next_ids[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            out = self(next_ids[:, None], cache=out.cache, use_cache=True)
        result = torch.cat(tokens, 1)
        if result.shape[1] < T + max_new_tokens:
            # every row emitted eos before the end: fill the rest with it
            result = F.pad(result, (0, T + max_new_tokens - result.shape[1]), value=eos_token_id)
        return result


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of logits [B, V] -> long [B] (argmax when temperature == 0)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def build_model(cfg: ModelConfig) -> CausalLM:
    """The CausalLM of cfg.arch; works under `with torch.device("meta")` (then call `init_weights` after
    `to_empty`)."""
    return CausalLM(cfg)
