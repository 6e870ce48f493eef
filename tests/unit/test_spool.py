"""The producer's SQLite spool: append/pending/remove, order across reopen, one producer per
spool, clear errors for files that are not spools; and AsyncProducer with a spool against the
in-process fake Kinesis: rows leave only once written, leftovers are sent first."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kinesis_butler.config import ProducerConfig
from kinesis_butler.errors import ButlerError, ConfigError, RecordFailed
from kinesis_butler.producer import AsyncProducer
from kinesis_butler.spool import AsyncSpool, Spool, SpoolCorrupt, SpoolLocked
from tests.unit.test_producer import FAST, FakeKinesis


def rows(n: int, start: int = 0) -> list[tuple[bytes, str, str | None]]:
    return [(b"r%d" % i, f"k{i % 3}", "7" if i % 2 else None) for i in range(start, start + n)]


def test_append_pending_remove(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", "orders") as spool:
        assert spool.pending() == []
        ids = spool.append(rows(5))
        assert ids == sorted(ids)
        assert len(set(ids)) == 5
        assert [(r.data, r.partition_key, r.explicit_hash_key) for r in spool.pending()] == rows(5)
        spool.remove([ids[0], ids[3]])
        assert [r.id for r in spool.pending()] == [ids[1], ids[2], ids[4]]
        spool.remove([ids[0]])  # removing twice is harmless
        assert len(spool.pending()) == 3


def test_reopen_keeps_order_and_ids_only_grow(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "s.db"  # the directory is created
    with Spool(path, "orders") as spool:
        first = spool.append(rows(4))
        spool.remove(first[-1:])  # the largest id is gone: a reused id would break the order
    with Spool(path, "orders") as spool:
        second = spool.append(rows(2, start=4))
        assert min(second) > max(first)
        assert [r.data for r in spool.pending()] == [b"r0", b"r1", b"r2", b"r4", b"r5"]


def test_a_second_producer_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    spool = Spool(path, "orders")
    with pytest.raises(SpoolLocked, match="in use by another producer"):
        Spool(path, "orders")
    spool.close()
    spool.close()  # idempotent
    Spool(path, "orders").close()


def test_the_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys
                from kinesis_butler.spool import Spool
                spool = Spool({str(path)!r}, "orders")
                spool.append([(b"x", "k", None)])
                print("open", flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(SpoolLocked, match=rf"pid {holder.pid}\)"):
            Spool(path, "orders")
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.stdout is not None
        holder.stdout.close()
    with Spool(path, "orders") as spool:
        assert [r.data for r in spool.pending()] == [b"x"]


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"definitely not SQLite " * 100)
    with pytest.raises(SpoolCorrupt, match="not a readable SQLite database"):
        Spool(path, "orders")
    Spool(tmp_path / "other.db", "orders").close()  # the failed open released its lock
    path.unlink()
    Spool(path, "orders").close()


def test_a_damaged_spool_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path, "orders") as spool:
        spool.append([(b"x" * 3000, "k", None) for _ in range(50)])
    data = bytearray(path.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # a page of the records table (the WAL was checkpointed at close)
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt), Spool(path, "orders") as spool:
        spool.pending()


def test_a_foreign_database_or_another_streams_spool_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    conn.close()
    with pytest.raises(SpoolCorrupt, match="not a kinesis-butler producer spool"):
        Spool(foreign, "orders")
    Spool(tmp_path / "s.db", "orders").close()
    with pytest.raises(SpoolCorrupt, match="belongs to stream 'orders', not 'payments'"):
        Spool(tmp_path / "s.db", "payments")


def test_an_unwritable_place_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot create the producer spool"):
        Spool(tmp_path / "file" / "s.db", "orders")
    with pytest.raises(ConfigError, match="spool_path"):
        ProducerConfig(spool_path="")


async def test_async_spool_group_commits_concurrent_appends(tmp_path: Path) -> None:
    spool = await AsyncSpool.open(str(tmp_path / "s.db"), "orders")
    commits: list[int] = []
    apply = spool.spool.apply

    def counting(records: list[tuple[bytes, str, str | None]], written: list[int]) -> list[int]:
        commits.append(len(records))
        return apply(records, written)

    spool.spool.apply = counting  # type: ignore[method-assign]
    futures = [spool.append(b"%d" % i, "k", None) for i in range(100)]
    ids = [await future for future in futures]
    assert ids == sorted(ids)
    assert sum(commits) == 100
    assert len(commits) <= 2  # the first append's commit, then everything queued meanwhile
    spool.mark_written(ids[:60])
    await spool.aclose()  # commits the queued deletions
    with Spool(tmp_path / "s.db", "orders") as reopened:
        assert [r.id for r in reopened.pending()] == ids[60:]


# -- AsyncProducer with a spool -----------------------------------------------------------------


def spooled(fake: FakeKinesis, path: Path, **config: object) -> AsyncProducer:
    cfg = ProducerConfig(spool_path=str(path), **{**FAST, "aggregate": False, **config})  # type: ignore[arg-type]
    return AsyncProducer("orders", client=fake, config=cfg)  # type: ignore[arg-type]


async def test_put_returns_once_spooled_and_rows_leave_once_written(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fake = FakeKinesis()
    fake.gate.clear()  # nothing is written yet
    async with spooled(fake, path) as prod:
        handles = [await prod.put(b"%d" % i, f"k{i}") for i in range(10)]
        # Read the file from a second connection: every accepted record is already there.
        with sqlite3.connect(path) as peek:
            assert peek.execute("SELECT count(*) FROM spool_records").fetchone()[0] == 10
        peek.close()
        fake.gate.set()
        await prod.flush()
        assert all(handle.exception() is None for handle in handles)
    with Spool(path, "orders") as spool:
        assert spool.pending() == []


async def test_records_left_in_the_spool_go_first_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path, "orders") as spool:
        spool.append([(b"old%d" % i, "same-key", None) for i in range(5)])
    fake = FakeKinesis()
    async with spooled(fake, path, ordered=True) as prod:
        handles = [await prod.put(b"new%d" % i, "same-key") for i in range(3)]
        await prod.flush()
        assert all(handle.exception() is None for handle in handles)
    assert [entry.data for _, _, entry in fake.written] == [
        *(b"old%d" % i for i in range(5)),
        *(b"new%d" % i for i in range(3)),
    ]
    with Spool(path, "orders") as spool:
        assert spool.pending() == []


async def test_a_failed_record_stays_in_the_spool_for_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fake = FakeKinesis()
    fake.fail = lambda entry: "InvalidArgumentException" if entry.data == b"bad" else None
    async with spooled(fake, path) as prod:
        good = await prod.put(b"good", "k")
        bad = await prod.put(b"bad", "k")
        await prod.flush()
        await good
        with pytest.raises(RecordFailed):
            await bad
    with Spool(path, "orders") as spool:
        assert [r.data for r in spool.pending()] == [b"bad"]


async def test_a_second_producer_on_the_same_spool_fails_to_start(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with spooled(FakeKinesis(), path):
        with pytest.raises(SpoolLocked):
            await spooled(FakeKinesis(), path).start()


def test_sync_producer_flushes_at_interpreter_exit_and_on_sigterm(tmp_path: Path) -> None:
    """A child puts with a stalled fake endpoint, then exits (or gets SIGTERM) without closing;
    the flush at exit writes everything."""
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent("""
            import os, signal, sys
            from kinesis_butler.config import ProducerConfig
            from kinesis_butler.sync import Producer
            from tests.unit.test_producer import FakeKinesis

            class Counting(FakeKinesis):
                async def put_records(self, stream, entries):
                    result = await super().put_records(stream, entries)
                    sys.stdout.write("wrote %d\\n" % len(entries))
                    sys.stdout.flush()
                    return result

            mode = sys.argv[1]
            config = ProducerConfig(linger=3600, aggregate=False)
            producer = Producer("orders", client=Counting(), config=config, install_signal_handlers=True)
            for i in range(7):
                producer.put(b"%d" % i, "k")
            if mode == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pause()
        """)
    )
    for mode in ("exit", "sigterm"):
        done = subprocess.run(
            [sys.executable, str(script), mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=Path(__file__).parents[2],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        assert done.stdout == "wrote 7\n", (mode, done.stderr)
        assert done.returncode == (143 if mode == "sigterm" else 0), done.stderr


def test_spool_errors_are_butler_errors() -> None:
    assert issubclass(SpoolLocked, ButlerError)
    assert issubclass(SpoolCorrupt, ButlerError)
