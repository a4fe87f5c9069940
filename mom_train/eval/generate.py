"""Sample from a checkpoint with the recurrent cache: text through the run's tokenizer, MQAR as token ids."""
from __future__ import annotations

import os

import torch

from mom_train.checkpoint import checkpoint_config, load_model, resolve_checkpoint
from mom_train.data import load_tokenizer
from mom_train.parallel.dims import resolve_device
from mom_train.precision import autocast_context


def generate_from_checkpoint(checkpoint: str | os.PathLike, prompt: str, max_new_tokens: int = 64,
                             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                             overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Continue `prompt` and return prompt + continuation as text.

    Text runs encode/decode with the checkpoint's data.tokenizer (BOS prepended, stops at EOS). MQAR runs
    have no tokenizer: the prompt is space-separated token ids ("1 5 40 9 33 5") and so is the output.
    """
    path = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(path, overrides)
    device = resolve_device(cfg)
    model = load_model(path, cfg, device)
    if cfg.data.source == "mqar":
        try:
            ids = [int(x) for x in prompt.split()]
        except ValueError:
            raise ValueError(f"this checkpoint was trained on MQAR (no tokenizer): give the prompt as space-separated "
                             f"token ids, e.g. \"1 5 40 9 33 5\"; got {prompt!r}") from None
        tokenizer, eos = None, None
    else:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        ids = tokenizer.encode_batch([prompt], add_bos=cfg.data.add_bos, add_eos=False)[0]
        eos = tokenizer.eos_id
    if not ids:
        raise ValueError("the prompt is empty; give at least one token")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast_context(cfg.training.precision, device):
        out = model.generate(input_ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             eos_token_id=eos, generator=generator)
    tokens = out[0].tolist()
    if tokenizer is None:
        return " ".join(map(str, tokens))
    if eos is not None and eos in tokens[len(ids):]:
        tokens = tokens[:len(ids) + tokens[len(ids):].index(eos)]
    return tokenizer.decode(tokens)
