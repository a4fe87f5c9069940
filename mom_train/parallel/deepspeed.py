"""The DeepSpeed engine (parallel.engine=deepspeed, and every ZeRO stage 3 run): DeepSpeed shards optimizer
state, gradients and (stage 3) parameters over the dp x cp ranks of each tp rank; our loop keeps the loader,
accumulation, loss normalisation, NaN policy, metrics, preemption and checkpoints.

What DeepSpeed gets from us:
- the model behind `DeepSpeedModel`, whose forward returns plain tensors (DeepSpeed's stage-3 hooks cannot see
  inside our ModelOutput); under stage 3 every block's parameters, and the embedding and final norm, are
  registered as the block's / root's external parameters (they are used outside the module that owns them:
  the fused norm, the tied LM head, the fused conv + delta-rule path);
- a torch AdamW (`GuardedAdamW`: fused on the device, no JIT-built DeepSpeed op) with our parameter groups,
  learning rate (set each step from our schedule) and clipping value, fp32 master weights, bf16 compute under
  our autocast;
- megatron-core's layout through `MegatronLayout` (the mpu interface: DeepSpeed's data-parallel group is our
  dp x cp group; tensor-parallel parameters are tagged `tensor_model_parallel`);
- the user's DeepSpeed JSON (parallel.deepspeed_config), merged under ours: our YAML wins, each conflict named.

On a CPU machine it starts in seconds: the CPU accelerator (DS_ACCELERATOR=cpu) and no shared-memory comm op
(its JIT build takes a minute).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mom_train.config import Config, ConfigError
from mom_train.parallel.dims import ParallelDims


def import_deepspeed(device: torch.device):
    """deepspeed, set up for this run's device (CPU accelerator on the host, no JIT-built comm op)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        try:
            import deepspeed
            import deepspeed.ops
        except ImportError as err:
            raise ConfigError(f"`parallel.engine` = deepspeed (or zero_stage=3) needs DeepSpeed, which is not "
                              f"installed ({err}); pip install deepspeed, or use parallel.zero_stage=1/2 with "
                              "parallel.engine=native") from None
    # its shared-memory collective op is compiled on first use (about a minute); gloo and NCCL need none
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # its notes (an optimizer it has not tested: our torch AdamW; our ModelOutput/Routing types it cannot look
    # into, whose tensors need no hooks) would repeat on every rank
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    return deepspeed


class MegatronLayout:
    """DeepSpeed's mpu interface over `ParallelDims`: model parallel = tp, data parallel = dp x cp."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp_size

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.tp_group if self.dims.tp_group is not None else dist.new_group([self.dims.rank])

    def get_data_parallel_rank(self) -> int:
        return self.dims.grad_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.grad_size

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.grad_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


class DeepSpeedModel(nn.Module):
    """The CausalLM for DeepSpeed: forward returns (loss_sum, aux_loss, router_load | None) as tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, cu_seqlens=None, labels=None, context=None):
        out = self.model(input_ids, cu_seqlens=cu_seqlens, labels=labels, context=context)
        return out.loss_sum, out.aux_loss, out.router_load


def register_stage3_externals(wrapper: DeepSpeedModel) -> None:
    """Under stage 3, gather each block's parameters for the whole block (the fused norm and the fused
    conv + delta-rule path read weights outside their own module's forward) and the embedding, final norm and
    head for the root (the tied head is read by the loss)."""
    from deepspeed.runtime.zero import register_external_parameter

    model = wrapper.model
    for block in model.layers:
        for p in block.parameters():
            register_external_parameter(block, p)
    for p in {model.embed.weight, model.norm.weight, model.head_weight}:
        register_external_parameter(wrapper, p)


class GuardedAdamW(torch.optim.AdamW):
    """Fused AdamW that skips its update (on the device, parameters and moments untouched) when the step's loss
    or any rank's gradient is not finite: `nonfinite` is set by the engine from the loss before each step; the
    gradients this rank holds (its ZeRO partition) are checked here and the decision agreed over every rank.
    The flag of the last step is kept in `skipped` (device scalar)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.nonfinite: torch.Tensor | None = None
        self.skipped: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            bad = (~torch.isfinite(torch.stack([g.float().abs().sum() for g in grads]).sum())).float()
        if self.nonfinite is not None:
            bad = torch.maximum(bad, self.nonfinite.to(device))
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.found_inf = bad
        self.skipped = bad
        return super().step(closure)


def deepspeed_config(cfg: Config, dims: ParallelDims, grad_accum: int, log=print) -> dict[str, Any]:
    """Our DeepSpeed config for this run, over the user's JSON (parallel.deepspeed_config) where given: every key
    both set differently is reported through `log` and ours is kept."""
    t, p = cfg.training, cfg.parallel
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,
        # fp32 master weights; the forward runs under our bf16 autocast
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }
    if p.deepspeed_config is None:
        return ours
    path = Path(p.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"`parallel.deepspeed_config` = {str(path)!r} cannot be read ({err.strerror}); give the "
                          "path of a DeepSpeed JSON file") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"`parallel.deepspeed_config` = {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"`parallel.deepspeed_config` = {str(path)!r} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in user:
            log(f"deepspeed config: ignoring {key!r} from {path} (the optimizer is our AdamW with "
                "training.lr/betas/eps/weight_decay and our warmup-cosine schedule)")
            user.pop(key)
    return _merge(user, ours, "", log)


def _merge(user: dict, ours: dict, where: str, log) -> dict:
    out = dict(user)
    for key, value in ours.items():
        name = f"{where}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, name + ".", log)
        else:
            if key in out and out[key] != value and key not in ("steps_per_print", "wall_clock_breakdown"):
                log(f"deepspeed config: {name} = {out[key]!r} from the JSON is replaced by {value!r} from the run's "
                    "config")
            out[key] = value
    return out


def tag_tensor_parallel(model: nn.Module) -> None:
    """Mark tp-sharded parameters as DeepSpeed expects (norms count them on every tp rank, others once)."""
    for p in model.parameters():
        if getattr(p, "tp_shard", None) is not None:
            p.tensor_model_parallel = True


# ---------------------------------------------------------------------------------- checkpoints


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (ZeRO wraps it)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def full_parameter(p: nn.Parameter) -> torch.Tensor:
    """This tp rank's whole fp32 value of a parameter (collective over the dp x cp group under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    return (full if full is not None else p.detach()).reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)


def full_moment(p: nn.Parameter, key: str, engine) -> torch.Tensor | None:
    """This tp rank's whole AdamW moment of a parameter, None before the first step (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        value = safe_get_full_optimizer_state(p, key)
        return None if value is None else value.reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
    state = _inner_optimizer(engine).state.get(p, {})
    return state.get(key)


def optimizer_step_count(engine) -> torch.Tensor | None:
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return state["step"].detach().cpu().clone()
    return None


def materialize_optimizer_state(engine, step: torch.Tensor) -> None:
    """Create AdamW's state (zero moments, the given step) for every tensor the optimizer steps, so that saved
    moments can be written into it before the first step."""
    opt = _inner_optimizer(engine)
    for group in opt.param_groups:
        for t in group["params"]:
            if t not in opt.state or "exp_avg" not in opt.state[t]:
                opt.state[t] = {"step": torch.as_tensor(step, dtype=torch.float32).clone().to(t.device),
                                "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
            else:
                opt.state[t]["step"] = torch.as_tensor(step, dtype=torch.float32).clone().to(t.device)
    # ZeRO 1/2 link every parameter to its fragment of the moments after the first step only; link them now
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def set_parameter(p: nn.Parameter, value: torch.Tensor, dims: ParallelDims) -> None:
    """Write this tp rank's whole value of a parameter into the model and DeepSpeed's fp32 master copy."""
    from deepspeed.utils import safe_set_full_fp32_param

    value = value.to(p.device, torch.float32)
    if hasattr(p, "ds_id"):
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([p], modifier_rank=dist.get_global_rank(dims.grad_group, 0)):
            if dims.grad_rank == 0:
                p.data.copy_(value.view_as(p))
    else:
        with torch.no_grad():
            p.copy_(value.view_as(p))
    safe_set_full_fp32_param(p, value)


def set_moment(p: nn.Parameter, key: str, value: torch.Tensor, engine) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    value = value.to(p.device, torch.float32)
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        safe_set_full_optimizer_state(p, value, key)
    else:
        _inner_optimizer(engine).state[p][key].copy_(value.view_as(p))
