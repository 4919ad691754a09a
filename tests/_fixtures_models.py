"""Fixtures for tiny test models and the embedded LM."""
