"""ConsumerConfig validation."""

from __future__ import annotations

import pytest

from kinesis_butler import ConfigError, ConsumerConfig


def test_defaults_follow_the_kcl() -> None:
    config = ConsumerConfig()
    assert config.failover_time == 10.0
    assert config.effective_renew_interval == pytest.approx(10 / 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failover_time": 0}, "failover_time must be > 0"),
        ({"renew_interval": 20.0}, "must be shorter than failover_time"),
        ({"max_records": 20_000}, "max_records must be within 1..10000"),
        ({"processor_max_attempts": 0}, "processor_max_attempts must be >= 1"),
        ({"max_leases": 0}, "max_leases must be >= 1"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConsumerConfig(**kwargs)  # type: ignore[arg-type]
