"""megapile: pretrain GPT-style language models on the Pile."""

__version__ = "0.1.0"
