"""Test support: tiny causal LMs and their locally trained tokenizer (not installed with the package)."""
