"""Lease stores: the Protocol and its backends."""

from kinesis_butler.stores.base import LeaseStore

__all__ = ["LeaseStore"]
