"""Hugging Face checkpoints: export ours (fla's classes, or Llama for Transformer++) and import them back.

    export_checkpoint("runs/mom_340m", "hf/mom_340m")            # config.json, safetensors, tokenizer
    import_hf("hf/mom_340m", "runs/mom_340m_continued")          # a run whose step 0 holds the weights

configs.py maps the configs, weights.py the tensors, tokenizer.py builds the tokenizer, files.py reads and
writes safetensors; safetensors and tokenizers are needed (pip install -e ".[hf]"), transformers and fla only
to load the result.
"""
from mom_train.hf.export import export_checkpoint
from mom_train.hf.importer import import_hf

__all__ = ["export_checkpoint", "import_hf"]
