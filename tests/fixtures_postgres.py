"""Pytest fixtures for the postgres lease store (registered in tests/conftest.py)."""
