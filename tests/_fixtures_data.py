"""Fixtures for the shared datasets (../shared/data)."""
