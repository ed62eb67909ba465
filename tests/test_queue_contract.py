"""The job-queue contract, run over every queue implementation (see ``tests/queues.py``).

The handler is scripted by the job's path: ``/block`` reports one file and waits until the
test releases it, ``/fail`` raises a bug, ``/refuse`` raises an expected error, ``/chatty``
reports progress many times (``/chatty-then-block`` then waits for ``resume_chatty``),
anything else completes at once.
"""

from __future__ import annotations

import asyncio

import pytest

from scanjobs.server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from scanjobs.server.jobs import JobEvent, JobSpec, JobState, ScanResult
from scanjobs.server.queue import AsyncioJobQueue
from tests.queues import PARTIAL, QueueFactory, ScriptedHandler, collect, until_state


async def test_job_goes_pending_running_completed_with_increasing_sequences(
    make_queue: QueueFactory,
) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler)
    job = await queue.submit(JobSpec("/ok"))
    assert job.state is JobState.PENDING

    events = await collect(await queue.watch(job.id))

    states = [e.job.state for e in events if e.state_change]
    assert states[-1] is JobState.COMPLETED
    assert [e.sequence for e in events] == sorted({e.sequence for e in events})
    final = events[-1].job
    assert final.result == ScanResult(added=3)
    assert final.start_time is not None and final.end_time is not None
    assert final.create_time <= final.start_time <= final.end_time


async def test_watcher_that_joins_before_start_sees_every_state(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, workers=1)
    blocker = await queue.submit(JobSpec("/block"))
    await handler.started_event(blocker.id).wait()
    job = await queue.submit(JobSpec("/ok"))
    watching = asyncio.create_task(collect(await queue.watch(job.id)))
    handler.release.set()

    events = await watching

    states = [e.job.state for e in events if e.state_change]
    assert states == [JobState.PENDING, JobState.RUNNING, JobState.COMPLETED]


async def test_cancel_of_pending_job_never_runs_it(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, workers=1)
    blocker = await queue.submit(JobSpec("/block"))
    await handler.started_event(blocker.id).wait()
    pending = await queue.submit(JobSpec("/ok"))

    cancelled = await queue.cancel(pending.id)
    handler.release.set()
    await until_state(queue, blocker.id, JobState.COMPLETED)

    assert cancelled.state is JobState.CANCELLED
    assert cancelled.end_time is not None
    assert pending.id not in handler.ran
    assert (await queue.get(pending.id)).state is JobState.CANCELLED


async def test_cancel_while_running_ends_cancelled_with_partial_result(
    make_queue: QueueFactory,
) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler)
    job = await queue.submit(JobSpec("/block"))
    await handler.started_event(job.id).wait()

    reply = await queue.cancel(job.id)
    final = await until_state(queue, job.id, JobState.CANCELLED)

    assert reply.state is JobState.RUNNING
    assert reply.cancel_requested
    assert final.result == PARTIAL
    assert final.error == ""
    assert handler.cancelled == [job.id]


async def test_cancel_twice_gives_the_same_answer(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler)
    job = await queue.submit(JobSpec("/block"))
    await handler.started_event(job.id).wait()

    first = await queue.cancel(job.id)
    second = await queue.cancel(job.id)
    await until_state(queue, job.id, JobState.CANCELLED)
    third = await queue.cancel(job.id)

    assert first.cancel_requested and second.cancel_requested
    assert third.state is JobState.CANCELLED


async def test_cancel_after_completion_is_failed_precondition(make_queue: QueueFactory) -> None:
    queue = await make_queue(ScriptedHandler())
    job = await queue.submit(JobSpec("/ok"))
    await until_state(queue, job.id, JobState.COMPLETED)

    with pytest.raises(FailedPrecondition) as caught:
        await queue.cancel(job.id)
    assert caught.value.reason == "JOB_ALREADY_ENDED"


async def test_timeout_ends_in_timeout_with_partial_result(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler)
    job = await queue.submit(JobSpec("/block", timeout_s=0.05))

    final = await until_state(queue, job.id, JobState.TIMEOUT)

    assert final.result == PARTIAL
    assert "timeout" in final.error
    assert final.timeout_s == 0.05


async def test_default_timeout_applies_when_the_request_has_none(
    make_queue: QueueFactory,
) -> None:
    queue = await make_queue(ScriptedHandler(), job_timeout_s=0.05)
    job = await queue.submit(JobSpec("/block"))
    assert job.timeout_s == 0.05
    await until_state(queue, job.id, JobState.TIMEOUT)


async def test_handler_bug_fails_the_job_without_leaking_its_text(
    make_queue: QueueFactory,
) -> None:
    queue = await make_queue(ScriptedHandler())
    job = await queue.submit(JobSpec("/fail"))
    final = await until_state(queue, job.id, JobState.FAILED)
    assert final.error == "internal error while scanning"
    assert "boom" not in final.error


async def test_expected_handler_error_fails_the_job_with_its_message(
    make_queue: QueueFactory,
) -> None:
    queue = await make_queue(ScriptedHandler())
    job = await queue.submit(JobSpec("/refuse"))
    final = await until_state(queue, job.id, JobState.FAILED)
    assert final.error == "/refuse vanished"


async def test_unknown_job_is_not_found_everywhere(make_queue: QueueFactory) -> None:
    queue = await make_queue(ScriptedHandler())
    for call in (queue.get("nope"), queue.cancel("nope"), queue.watch("nope")):
        with pytest.raises(NotFound):
            await call


async def test_many_jobs_never_run_more_than_the_worker_count(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, workers=2)
    jobs = [await queue.submit(JobSpec("/block")) for _ in range(6)]
    await handler.started_event(jobs[0].id).wait()
    await handler.started_event(jobs[1].id).wait()
    await asyncio.sleep(0.05)  # give a third worker every chance to (wrongly) start

    states = [(await queue.get(j.id)).state for j in jobs]
    assert states.count(JobState.RUNNING) == 2
    assert states.count(JobState.PENDING) == 4
    handler.release.set()
    for job in jobs:
        await until_state(queue, job.id, JobState.COMPLETED)
    assert sorted(handler.ran) == sorted(j.id for j in jobs)


async def test_pending_limit_is_resource_exhausted(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, workers=1, max_pending=2)
    first = await queue.submit(JobSpec("/block"))
    await handler.started_event(first.id).wait()
    await queue.submit(JobSpec("/ok"))
    waiting = await queue.submit(JobSpec("/ok"))
    with pytest.raises(ResourceExhausted):
        await queue.submit(JobSpec("/ok"))
    await queue.cancel(waiting.id)  # frees a slot
    await queue.submit(JobSpec("/ok"))
    handler.release.set()


async def test_watcher_joining_late_starts_with_the_current_snapshot(
    make_queue: QueueFactory,
) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler)
    job = await queue.submit(JobSpec("/block"))
    await handler.started_event(job.id).wait()
    subscription = await queue.watch(job.id)

    first = await anext(subscription)
    handler.release.set()
    rest = await collect(subscription)

    assert first.job.state is JobState.RUNNING
    assert first.job.result == PARTIAL
    assert rest[-1].job.state is JobState.COMPLETED


async def test_watch_of_finished_job_sends_one_snapshot(make_queue: QueueFactory) -> None:
    queue = await make_queue(ScriptedHandler())
    job = await queue.submit(JobSpec("/ok"))
    await until_state(queue, job.id, JobState.COMPLETED)

    events = await collect(await queue.watch(job.id))

    assert len(events) == 1
    assert events[0].job.state is JobState.COMPLETED
    assert queue.watcher_count(job.id) == 0


async def test_after_sequence_replays_what_was_missed(make_queue: QueueFactory) -> None:
    queue = await make_queue(ScriptedHandler())
    job = await queue.submit(JobSpec("/ok"))
    full = await collect(await queue.watch(job.id))
    everything = await collect(await queue.watch(job.id, after_sequence=1))
    caught_up = await collect(await queue.watch(job.id, after_sequence=full[-1].sequence))

    assert everything[0].sequence == 2
    assert everything[-1] == full[-1]
    assert caught_up == []
    with pytest.raises(InvalidArgument):
        await queue.watch(job.id, after_sequence=full[-1].sequence + 1)


async def test_slow_watcher_does_not_block_the_job_and_gets_coalesced_progress(
    make_queue: QueueFactory,
) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, progress_interval_s=0.0, workers=1)
    blocker = await queue.submit(JobSpec("/block"))
    await handler.started_event(blocker.id).wait()
    job = await queue.submit(JobSpec("/chatty-then-block"))
    slow = await queue.watch(job.id)  # subscribed, never read until the end
    fast_events = []
    async with await queue.watch(job.id) as fast:
        handler.release.set()  # both watchers are there before the job starts
        async for event in fast:
            fast_events.append(event)
            if not event.state_change:  # it saw progress: the job may end now
                handler.resume_chatty.set()

    slow_events = await collect(slow)

    assert slow_events[-1].job.state is JobState.COMPLETED
    assert len(slow_events) <= 4  # the snapshot, then states; progress coalesced away
    assert len(fast_events) > len(slow_events)
    assert [e.sequence for e in slow_events] == sorted({e.sequence for e in slow_events})


async def test_progress_is_rate_limited_per_job(make_queue: QueueFactory) -> None:
    queue = await make_queue(ScriptedHandler(), progress_interval_s=10.0)
    job = await queue.submit(JobSpec("/chatty"))
    events = await collect(await queue.watch(job.id))
    assert events[-1].job.result == ScanResult(added=2000)
    assert len(events) < 10


async def test_closed_watcher_is_forgotten_at_once(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler)
    job = await queue.submit(JobSpec("/block"))
    await handler.started_event(job.id).wait()
    subscription = await queue.watch(job.id)
    assert queue.watcher_count(job.id) == 1

    reader = asyncio.create_task(collect(subscription))
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader

    assert queue.watcher_count() == 0
    handler.release.set()


async def test_close_stops_running_jobs_and_ends_watchers_with_unavailable(
    make_queue: QueueFactory,
) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler)
    job = await queue.submit(JobSpec("/block"))
    await handler.started_event(job.id).wait()
    subscription = await queue.watch(job.id)
    await anext(subscription)

    await queue.close(grace_s=1.0)

    with pytest.raises(Unavailable):
        await anext(subscription)
    with pytest.raises(Unavailable):
        await queue.submit(JobSpec("/ok"))
    assert handler.cancelled == [job.id]
    assert (await queue.get(job.id)).state is JobState.RUNNING  # resumable, not terminal
    assert queue.running_tasks == 0
    await queue.close()  # idempotent


# -- durability: a second queue on the same store is the server after a restart ----------


async def test_restart_resumes_a_running_job_and_sequences_keep_increasing(
    make_queue: QueueFactory,
) -> None:
    handler = ScriptedHandler()
    first = await make_queue(handler)
    job = await first.submit(JobSpec("/block"))
    await handler.started_event(job.id).wait()
    seen = await collect_until_running(first, job.id)
    await first.close(grace_s=1.0)

    again = ScriptedHandler()
    again.release.set()
    second = await make_queue(again)
    final = await until_state(second, job.id, JobState.COMPLETED)
    resumed = await collect(await second.watch(job.id, after_sequence=seen[-1].sequence))

    assert again.ran == [job.id]
    assert final.attempts == 2
    assert final.result == ScanResult(added=2)
    assert all(e.sequence > seen[-1].sequence for e in resumed)
    assert resumed[-1].job.state is JobState.COMPLETED


async def collect_until_running(queue: AsyncioJobQueue, job_id: str) -> list[JobEvent]:
    events = []
    async with await queue.watch(job_id, after_sequence=0) as subscription:
        async for event in subscription:
            events.append(event)
            if event.job.state is JobState.RUNNING:
                break
    return events


async def test_restart_keeps_pending_jobs_pending_and_runs_them(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    first = await make_queue(handler, workers=1)
    blocker = await first.submit(JobSpec("/block"))
    await handler.started_event(blocker.id).wait()
    waiting = await first.submit(JobSpec("/ok"))
    await first.close(grace_s=1.0)

    again = ScriptedHandler()
    again.release.set()
    second = await make_queue(again, workers=1)
    assert (await second.get(waiting.id)).state in {JobState.PENDING, JobState.RUNNING}
    await until_state(second, waiting.id, JobState.COMPLETED)
    await until_state(second, blocker.id, JobState.COMPLETED)


async def test_a_job_interrupted_too_often_fails_instead_of_looping(
    make_queue: QueueFactory,
) -> None:
    job_id = ""
    for _ in range(3):
        handler = ScriptedHandler()
        queue = await make_queue(handler, max_attempts=3)
        if not job_id:
            job_id = (await queue.submit(JobSpec("/block"))).id
        await handler.started_event(job_id).wait()
        await queue.close(grace_s=1.0)

    handler = ScriptedHandler()
    queue = await make_queue(handler, max_attempts=3)
    final = await until_state(queue, job_id, JobState.FAILED)

    assert handler.ran == []
    assert final.attempts == 3
    assert "interrupted 3 times" in final.error


async def test_cancel_of_a_job_waiting_to_resume_ends_it_at_once(
    make_queue: QueueFactory,
) -> None:
    handler = ScriptedHandler()
    first = await make_queue(handler, workers=1)
    a = await first.submit(JobSpec("/block"))
    await handler.started_event(a.id).wait()
    await first.close(grace_s=1.0)

    again = ScriptedHandler()
    second = await make_queue(again, workers=1)
    await again.started_event(a.id).wait()
    reply = await second.cancel(a.id)
    final = await until_state(second, a.id, JobState.CANCELLED)
    assert reply.cancel_requested
    assert final.state is JobState.CANCELLED


async def test_replay_after_the_end_comes_from_the_store(make_queue: QueueFactory) -> None:
    handler = ScriptedHandler()
    queue = await make_queue(handler, progress_interval_s=0.0, history=4)
    job = await queue.submit(JobSpec("/chatty"))
    live = await collect(await queue.watch(job.id))

    replay = await collect(await queue.watch(job.id, after_sequence=1))

    states = [e.job.state for e in replay if e.state_change]
    assert states == [JobState.RUNNING, JobState.COMPLETED]
    assert replay[-1].sequence == live[-1].sequence


async def test_same_request_id_returns_the_same_job_even_concurrently(
    make_queue: QueueFactory,
) -> None:
    queue = await make_queue(ScriptedHandler())
    spec = JobSpec("/ok", request_id="retry-1")
    jobs = await asyncio.gather(*(queue.submit(spec) for _ in range(20)))
    assert len({j.id for j in jobs}) == 1
    page, _ = await queue.list_jobs(state=None, page_size=100, page_token="")
    assert len(page) == 1


async def test_same_request_id_for_another_request_is_already_exists(
    make_queue: QueueFactory,
) -> None:
    queue = await make_queue(ScriptedHandler())
    await queue.submit(JobSpec("/ok", request_id="r"))
    with pytest.raises(AlreadyExists):
        await queue.submit(JobSpec("/other", request_id="r"))


async def test_request_ids_survive_a_restart(make_queue: QueueFactory) -> None:
    first = await make_queue(ScriptedHandler())
    job = await first.submit(JobSpec("/ok", request_id="r"))
    await until_state(first, job.id, JobState.COMPLETED)
    await first.close()
    second = await make_queue(ScriptedHandler())
    assert (await second.submit(JobSpec("/ok", request_id="r"))).id == job.id


async def test_ended_jobs_past_retention_are_pruned(make_queue: QueueFactory) -> None:
    first = await make_queue(ScriptedHandler())
    job = await first.submit(JobSpec("/ok"))
    await until_state(first, job.id, JobState.COMPLETED)
    await first.close()
    second = await make_queue(ScriptedHandler(), retention_s=0.0)
    with pytest.raises(NotFound):
        await second.get(job.id)
