"""Pytest fixtures for the dynamodb lease store (registered in tests/conftest.py)."""
