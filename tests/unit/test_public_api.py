"""The curated public surface."""

from __future__ import annotations

import kinesis_butler


def test_all_lists_exactly_the_public_names() -> None:
    exported = set(kinesis_butler.__all__)
    assert {
        "AsyncConsumer",
        "Consumer",
        "Record",
        "RecordProcessorBase",
        "LeaseLost",
        "open_store",
        "ordered_parallel",
        "AsyncProducer",
        "Producer",
        "ProducerConfig",
        "PutHandle",
        "PutResult",
        "RecordFailed",
        "RecordRejected",
    } <= exported
    for name in exported:
        assert hasattr(kinesis_butler, name), name
    public = {name for name in vars(kinesis_butler) if not name.startswith("_")}
    modules = {
        "aws",
        "balancing",
        "config",
        "consumer",
        "discovery",
        "errors",
        "leasing",
        "lifecycle",
        "models",
        "processor",
        "retrieval",
        "stores",
        "sync",
        "testing",
        "progress",
        "streams",
        "iteration",
        "parallel",
        "producer",
        "producer_batching",
        "spool",
    }
    assert public - modules == exported - {"__version__"}


def test_the_package_is_typed() -> None:
    from importlib.resources import files

    assert files("kinesis_butler").joinpath("py.typed").is_file()
