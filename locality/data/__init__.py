"""Datasets: offline built-ins, hub datasets, tokenizers and the datamodule."""
