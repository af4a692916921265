"""Builders of the bundled tiny default: corpus, tokenizer, base model, SFT data."""
