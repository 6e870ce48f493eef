"""kill -9 during a burst with the spool on: after a restart on the same spool every record whose
``put`` had returned is in the stream (read back with AsyncConsumer from the emulator)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from kinesis_butler import AsyncConsumer
from kinesis_butler.aws import KinesisClient
from kinesis_butler.config import ProducerConfig
from kinesis_butler.producer import AsyncProducer
from kinesis_butler.spool import Spool
from tests.helpers import Collector, consume_until
from tests.integration.conftest import DEADLINE, StreamFactory
from tests.integration.test_producer import CONSUMER

pytestmark = pytest.mark.integration

ACCEPTED_BEFORE_KILL = 2000  # the child is killed once at least this many puts returned

CHILD = textwrap.dedent("""
    import asyncio, json, sys
    from kinesis_butler.aws import AwsCredentials, KinesisClient
    from kinesis_butler.config import ProducerConfig
    from kinesis_butler.producer import AsyncProducer

    async def main():
        endpoint, stream, spool = sys.argv[1:4]
        client = KinesisClient(
            endpoint_url=endpoint, region="us-east-1", credentials=AwsCredentials("test", "test")
        )
        config = ProducerConfig(spool_path=spool, linger=0.02, max_batch_records=100)
        producer = AsyncProducer(stream, client=client, config=config)
        await producer.start()
        n = 0
        while True:  # an endless burst: the parent kills it mid-way
            await producer.put(json.dumps({"n": n}).encode(), f"key-{n % 31}")
            sys.stdout.write(f"{n}\\n")  # accepted: put returned
            sys.stdout.flush()
            n += 1

    asyncio.run(main())
""")


async def test_kill_9_mid_burst_loses_no_accepted_record(
    kinesis: KinesisClient, kinesis_endpoint: str, new_stream: StreamFactory, tmp_path: Path
) -> None:
    stream = await new_stream(1)  # one shard: the read order is the write order
    spool_path = tmp_path / "spool.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(script), kinesis_endpoint, stream, str(spool_path), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    accepted: set[int] = set()
    try:
        async with asyncio.timeout(DEADLINE * 3):
            while len(accepted) < ACCEPTED_BEFORE_KILL:
                line = await child.stdout.readline()
                assert line.endswith(b"\n"), "the child ended before it was killed"
                accepted.add(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        rest = await child.stdout.read()  # what it printed before the kill landed
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    accepted |= {int(line) for line in rest.split(b"\n")[:-1]}  # complete lines only
    assert accepted == set(range(len(accepted)))

    # Left in the spool: accepted and not known written; also records committed to the spool
    # whose "accepted" line the kill cut off. Some may have been written just before the kill.
    with Spool(spool_path, stream) as spool:
        left = {json.loads(row.data)["n"] for row in spool.pending()}
    assert left, "the kill should catch records not yet written"

    async with AsyncProducer(stream, client=kinesis, config=ProducerConfig(spool_path=str(spool_path))):
        pass  # start sends what the spool holds; close flushes it and empties the spool
    with Spool(spool_path, stream) as spool:
        assert spool.pending() == []

    expected = accepted | left
    collect = Collector()
    consumer = AsyncConsumer(stream, "app", collect, store="memory://", client=kinesis, config=CONSUMER)
    await consume_until(consumer, lambda: expected <= set(collect.numbers))
    seen = Counter(collect.numbers)
    # Every accepted record is in the stream; nothing else but records the spool held.
    assert accepted <= seen.keys() <= expected
    # A record leaves the spool only after its PutRecords succeeded, so a record that was not
    # left in the spool was written exactly once; one left there may also have been written
    # just before the kill (its deletion not yet committed): at most twice.
    assert all(count == 1 for n, count in seen.items() if n not in left)
    assert all(count <= 2 for n, count in seen.items() if n in left)
