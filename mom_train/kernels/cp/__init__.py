"""Op-level context parallelism: recurrent states and conv halos passed across the ranks that split one
packed sequence (see state_passing.py)."""
from mom_train.kernels.cp.state_passing import (
    ContextParallel, check_context_inputs, compose_conv_prefix, compose_prefix, context_conv_states,
    context_parallel_conv_states, context_parallel_gated_delta_rule, stream_chains)

__all__ = ["ContextParallel", "check_context_inputs", "compose_conv_prefix", "compose_prefix", "context_conv_states",
           "context_parallel_conv_states", "context_parallel_gated_delta_rule", "stream_chains"]
