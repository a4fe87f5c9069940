"""Sample from a checkpoint with the recurrent cache: text through the run's tokenizer, MQAR as token ids."""
from __future__ import annotations

import os
import sys

import torch

from mom_train.checkpoint import open_checkpoint
from mom_train.config import Config
from mom_train.data import load_tokenizer
from mom_train.errors import InputError
from mom_train.precision import autocast_context


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """InputError naming the flag when a sampling setting is out of range."""
    if max_new_tokens < 0:
        raise InputError(f"--max-new-tokens {max_new_tokens} is negative; give a count >= 0")
    if temperature < 0:
        raise InputError(f"--temperature {temperature} is negative; give 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise InputError(f"--top-p {top_p} is outside (0, 1]; give e.g. 0.9, or 1 to keep every token")
    if top_k < 0:
        raise InputError(f"--top-k {top_k} is negative; give 0 (off) or a positive count")


def mqar_prompt_ids(prompt: str, cfg: Config) -> list[int]:
    """The token ids of an MQAR prompt ("1 5 40 9 33 5"); InputError naming the fix for anything else."""
    example = "e.g. \"1 5 70 9 80 5\" (1 = BOS, then key value pairs, then a key to query)"
    words = prompt.split()
    if not words:
        raise InputError(f"the prompt is empty; this checkpoint was trained on MQAR: give token ids, {example}")
    bad = [w for w in words if not w.isdigit()]
    if bad:
        raise InputError(f"this checkpoint was trained on MQAR (no tokenizer), so the prompt must be "
                         f"space-separated token ids; {bad[0]!r} is not one. Give ids, {example}")
    ids = [int(w) for w in words]
    vocab = cfg.model.vocab_size
    out_of_range = [i for i in ids if i >= vocab]
    if out_of_range:
        raise InputError(f"token id {out_of_range[0]} is out of range: this model's ids are 0..{vocab - 1}")
    return ids


def generate_from_checkpoint(checkpoint: str | os.PathLike, prompt: str, max_new_tokens: int = 64,
                             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                             overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Continue `prompt` and return prompt + continuation as text.

    Text runs encode/decode with the checkpoint's data.tokenizer (BOS prepended, stops at EOS). MQAR runs
    have no tokenizer: the prompt is space-separated token ids ("1 5 40 9 33 5") and so is the output.
    """
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    _, cfg, model = open_checkpoint(checkpoint, overrides, note=lambda text: print(text, file=sys.stderr))
    device = next(model.parameters()).device
    if cfg.data.source == "mqar":
        ids = mqar_prompt_ids(prompt, cfg)
        tokenizer, eos = None, None
    else:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        ids = tokenizer.encode_batch([prompt], add_bos=cfg.data.add_bos, add_eos=False)[0]
        eos = tokenizer.eos_id
    if not ids:
        raise InputError("the prompt is empty; give some text to continue")
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
