"""Pytest fixtures for the redis lease store (registered in tests/conftest.py)."""
