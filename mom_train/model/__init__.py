"""Models: plain single-device nn.Modules that read sizes from tensor shapes.

    model = build_model(cfg.model)
    out = model(input_ids, cu_seqlens=cu_seqlens, labels=labels)   # ModelOutput
"""
from mom_train.model.counting import count_parameters, flops_per_token, state_bytes
from mom_train.model.lm import CausalLM, ModelOutput, build_model

__all__ = ["build_model", "CausalLM", "ModelOutput", "count_parameters", "flops_per_token", "state_bytes"]
