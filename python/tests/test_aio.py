"""asyncio: the async iterator of changes, AsyncWatcher, and the watcher's
descriptor in the event loop."""

import asyncio

import pytest

import sysgenid
import sysgenid.aio


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_changes_yields_each_new_generation_and_acks_it(daemon):
    async def main():
        seen = []
        loop = asyncio.get_running_loop()
        it = sysgenid.aio.changes(runtime_dir=daemon.dir)
        first = asyncio.ensure_future(it.__anext__())
        await loop.run_in_executor(None, daemon.wait_watchers_registered, 1)
        assert not first.done(), "nothing yielded before a change"
        await loop.run_in_executor(None, daemon.bump)
        seen.append(await first)
        assert daemon.status()["outdated"] == 1, "not acked while the body runs"
        nxt = asyncio.ensure_future(it.__anext__())
        await asyncio.sleep(0.2)
        assert daemon.status()["outdated"] == 0, "acked when the next one was asked for"
        await loop.run_in_executor(None, daemon.bump, 7)
        seen.append(await nxt)
        await it.aclose()
        return seen

    assert run(main()) == [1, 7]
    daemon.wait_watchers_registered(0)


def test_a_superseded_generation_is_followed_by_the_newer_one(daemon):
    async def main():
        it = sysgenid.aio.changes(runtime_dir=daemon.dir)
        first = asyncio.ensure_future(it.__anext__())
        await asyncio.get_running_loop().run_in_executor(None, daemon.wait_watchers_registered, 1)
        daemon.bump()
        g1 = await first
        daemon.bump()  # while the body "runs": its ack will be refused
        g2 = await it.__anext__()
        await it.aclose()
        return g1, g2

    assert run(main()) == (1, 2)


def test_async_watcher_read_ack_and_barrier(daemon):
    async def main():
        async with sysgenid.aio.AsyncWatcher(runtime_dir=daemon.dir) as w:
            other = daemon.watcher()
            reading = asyncio.ensure_future(w.read())
            await asyncio.sleep(0.1)
            assert not reading.done()
            assert await w.trigger_update() == 1
            assert await reading == 1
            with pytest.raises(sysgenid.WrongGeneration):
                await w.ack(5)
            with pytest.raises(InterruptedError):
                await w.wait_watchers(5)
            await w.ack(1)
            with pytest.raises(TimeoutError):
                await w.wait_watchers(0.2)
            other.ack(other.read())
            await w.wait_watchers(5)
            assert (await w.status())["outdated"] == 0
            other.close()

    run(main())


def test_a_cancelled_read_leaves_the_watcher_usable(daemon):
    async def main():
        async with sysgenid.aio.AsyncWatcher(runtime_dir=daemon.dir) as w:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(w.read(), 0.1)
            daemon.bump()
            assert await w.read() == 1

    run(main())


def test_the_plain_watcher_fd_works_with_add_reader(daemon):
    w = daemon.watcher(nonblocking=True)

    async def main():
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(w.fileno(), lambda: ready.done() or ready.set_result(w.read()))
        loop.call_later(0.1, daemon.bump)
        try:
            return await ready
        finally:
            loop.remove_reader(w.fileno())

    assert run(main()) == 1
    w.close()
