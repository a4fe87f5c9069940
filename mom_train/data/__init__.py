"""Data: Mistral tokenizer, SlimPajama / files / synthetic MQAR sources, packing with cu_seqlens, stateful loader.

    loader = build_loader(cfg, dp_rank, dp_size)      # iterator of Batch
    batch = next(loader)                              # input_ids/labels [1, T], cu_seqlens [N+1], stats
    sd = loader.state_dict(); loader.load_state_dict(sd)
"""
from mom_train.data.loader import Loader, MQARLoader, TextLoader, build_loader
from mom_train.data.mqar import generate_mqar, recall_accuracy
from mom_train.data.packing import IGNORE_INDEX, Batch, Packer
from mom_train.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Batch", "IGNORE_INDEX", "Loader", "MQARLoader", "Packer", "TextLoader", "Tokenizer", "build_loader",
           "generate_mqar", "load_tokenizer", "recall_accuracy"]
