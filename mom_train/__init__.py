"""mom_train: pretraining Mixture-of-Memories language models end to end."""
__version__ = "0.1.0"
