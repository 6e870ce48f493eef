"""Loading processors by path, and adapting functions and classes."""

from __future__ import annotations

import pytest

from kinesis_butler.errors import ProcessorImportError
from kinesis_butler.processor import FunctionProcessor, as_processor_factory, load_processor
from tests.unit.fixtures import processors


@pytest.mark.parametrize("name", ["plain", "coroutine"])
def test_functions_are_wrapped_in_a_checkpointing_processor(name: str) -> None:
    factory = load_processor(f"tests.unit.fixtures.processors:{name}")
    assert isinstance(factory(), FunctionProcessor)


def test_a_processor_class_gives_one_instance_per_shard() -> None:
    factory = load_processor("tests.unit.fixtures.processors:Klass")
    first, second = factory(), factory()
    assert isinstance(first, processors.Klass) and first is not second


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_colon", "expected 'package.module:function'"),
        ("missing.module.xyz:f", "cannot import module 'missing.module.xyz'"),
        ("tests.unit.fixtures.processors:nope", "has no attribute 'nope'"),
        ("tests.unit.fixtures.processors:NOT_CALLABLE", "neither a processor class nor a function"),
    ],
)
def test_bad_processor_paths_say_what_is_wrong(path: str, message: str) -> None:
    with pytest.raises(ProcessorImportError, match=message):
        load_processor(path)


def test_an_instance_instead_of_a_class_is_refused() -> None:
    with pytest.raises(ProcessorImportError, match="not an instance"):
        as_processor_factory(processors.Klass())
