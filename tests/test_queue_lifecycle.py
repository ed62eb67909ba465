"""Where the two queue implementations once drifted apart, run over every implementation.

Each test here failed for the replicated (PostgreSQL) queue before both queues ran on the one
job runner: the watcher limit per job, the thinning of an ended job's progress events, the
order of commit and listeners, the reason of a shutdown, and the cap on kept jobs.
"""

from __future__ import annotations

import asyncio

import pytest

from scanjobs.server.errors import NotFound, ResourceExhausted, ShuttingDown
from scanjobs.server.jobs import JobEvent, JobSpec, JobState
from tests.queues import QueueFactory, ScriptedHandler, collect, until_state


async def test_watchers_of_one_job_are_limited_per_job(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, max_watchers_per_job=2, max_watchers=10)
    busy = await queue.submit(JobSpec("/block"))
    other = await queue.submit(JobSpec("/block"))
    await handler.started_event(busy.id).wait()
    first, second = await queue.watch(busy.id), await queue.watch(busy.id)

    with pytest.raises(ResourceExhausted) as refused:
        await queue.watch(busy.id)
    elsewhere = await queue.watch(other.id)  # another job still has room

    assert refused.value.reason == "TOO_MANY_WATCHERS"
    assert "of this job" in refused.value.message
    first.close()
    (await queue.watch(busy.id)).close()  # a closed watcher frees its place
    for subscription in (second, elsewhere):
        subscription.close()
    handler.release.set()


async def test_an_ended_job_keeps_only_its_state_changes(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, progress_interval_s=0.0)
    job = await queue.submit(JobSpec("/chatty-then-block"))
    live: list[JobEvent] = []
    async with await queue.watch(job.id) as events:
        async for event in events:
            live.append(event)
            if not event.state_change:
                handler.resume_chatty.set()  # it ends once its progress was seen

    replay = await collect(await queue.watch(job.id, after_sequence=1))

    assert any(not e.state_change for e in live), "progress was published while it ran"
    assert [e.job.state for e in replay] == [JobState.RUNNING, JobState.COMPLETED]
    assert all(e.state_change for e in replay)


async def test_a_progress_write_due_as_the_job_ends_never_hides_the_terminal_event(
    make_queue: QueueFactory,
) -> None:
    # With no interval, the progress write is spawned in the same loop turn as the end, and
    # it used to start after the end was decided: it then wrote the terminal snapshot as
    # progress, which the end's thinning deleted, and the stored history had no end at all.
    ended: set[str] = set()
    all_ended = asyncio.Event()

    def listener(event: JobEvent) -> None:
        if event.job.terminal:
            ended.add(event.job.id)
            if len(ended) == 24:
                all_ended.set()

    queue = await make_queue(
        ScriptedHandler(), listeners=[listener], progress_interval_s=0.0, workers=4
    )
    jobs = [await queue.submit(JobSpec("/report-then-end")) for _ in range(24)]
    async with asyncio.timeout(60):
        await all_ended.wait()

    for job in jobs:
        async with asyncio.timeout(10):  # a history without its end never ends
            replay = await collect(await queue.watch(job.id, after_sequence=1))
        assert replay, "the stored history ends before the end"
        assert replay[-1].job.state is JobState.COMPLETED
        assert replay[-1].state_change


async def test_listeners_hear_of_an_event_only_once_it_is_committed(
    make_queue: QueueFactory,
) -> None:
    heard: list[tuple[int, int]] = []

    def listener(event: JobEvent) -> None:
        heard.append((event.sequence, make_queue.committed_sequence(event.job.id)))

    queue = await make_queue(ScriptedHandler(), listeners=[listener])
    job = await queue.submit(JobSpec("/ok"))
    await until_state(queue, job.id, JobState.COMPLETED)
    pending = await queue.submit(JobSpec("/block"))
    await queue.cancel(pending.id)

    assert len(heard) >= 4  # submit, start, end, and the second job's submit or cancel
    for sequence, committed in heard:
        assert committed >= sequence


async def test_close_ends_watchers_with_the_shutdown_reason(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler)
    job = await queue.submit(JobSpec("/block"))
    await handler.started_event(job.id).wait()
    subscription = await queue.watch(job.id)
    await anext(subscription)

    await queue.close(grace_s=1.0)

    with pytest.raises(ShuttingDown) as ended:  # after what was queued before the close
        async with asyncio.timeout(30):
            async for _ in subscription:
                pass
    with pytest.raises(ShuttingDown) as refused:
        await queue.submit(JobSpec("/ok"))
    assert ended.value.reason == refused.value.reason == "SHUTTING_DOWN"


async def test_the_oldest_ended_jobs_make_room_beyond_max_jobs(make_queue: QueueFactory) -> None:
    queue = await make_queue(ScriptedHandler(), max_jobs=3, workers=1)
    ended = []
    for _ in range(3):
        job = await queue.submit(JobSpec("/ok"))
        ended.append(await until_state(queue, job.id, JobState.COMPLETED))

    fresh = await queue.submit(JobSpec("/ok"))

    with pytest.raises(NotFound):
        await queue.get(ended[0].id)
    listed, token = await queue.list_jobs(state=None, page_size=10, page_token="")
    assert [j.id for j in listed] == [fresh.id, ended[2].id, ended[1].id]
    assert token == ""
    await until_state(queue, fresh.id, JobState.COMPLETED)


async def test_max_jobs_of_unfinished_jobs_is_resource_exhausted(
    make_queue: QueueFactory,
) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, max_jobs=2, workers=1)
    running = await queue.submit(JobSpec("/block"))
    await handler.started_event(running.id).wait()
    await queue.submit(JobSpec("/ok"))

    with pytest.raises(ResourceExhausted) as refused:
        await queue.submit(JobSpec("/ok"))

    assert refused.value.reason == "TOO_MANY_JOBS"
    handler.release.set()


async def test_listing_by_state_pages_through_that_state_only(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, workers=1)
    done = []
    for _ in range(3):
        job = await queue.submit(JobSpec("/ok"))
        done.append(await until_state(queue, job.id, JobState.COMPLETED))
        cancelled = await queue.submit(JobSpec("/block"))
        await queue.cancel(cancelled.id)

    seen: list[str] = []
    token = ""
    for _ in range(3):
        page, token = await queue.list_jobs(state=JobState.COMPLETED, page_size=1, page_token=token)
        seen += [j.id for j in page]
        if not token:
            break

    assert seen == [j.id for j in reversed(done)]
    assert token == ""


async def test_close_never_returns_with_a_task_still_running(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, workers=2)
    stubborn = await queue.submit(JobSpec("/stubborn"))
    await handler.started_event(stubborn.id).wait()

    await queue.close(grace_s=0.2)  # the handler ignores its first cancel

    assert queue.running_tasks == 0
    assert handler.cancelled == [stubborn.id]
    assert (await queue.get(stubborn.id)).state is JobState.RUNNING  # resumes next start
