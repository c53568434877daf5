"""AsyncEngine over a toy engine: streaming, concurrency, abort on disconnect, errors, timing, messages."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pagedllm.engine.async_engine import AsyncEngine, EngineOverloadedError, EngineStepError
from pagedllm.sampling_params import SamplingParams
from pagedllm.server.request_stats import RequestStatsTracker, RequestTiming
from tests.server.toy_engine import ToyEngine, expected_text


class Recorder:
    def __init__(self) -> None:
        self.first: list[str] = []
        self.finished: list[RequestTiming] = []
        self.num_inter_token = 0
        self.threads: set[int] = set()

    def on_first_token(self, timing: RequestTiming) -> None:
        self.threads.add(threading.get_ident())
        self.first.append(timing.request_id)

    def on_inter_token(self, timing: RequestTiming) -> None:
        self.num_inter_token += 1

    def on_request_finished(self, timing: RequestTiming) -> None:
        self.finished.append(timing)


def _listen(async_engine: AsyncEngine, recorder: Recorder) -> None:
    """What the server's metrics do: records -> RequestStatsTracker -> StatsListener."""
    async_engine.add_record_listener(RequestStatsTracker([recorder]).on_records)


@pytest.fixture
def toy():
    engine = ToyEngine()
    async_engine = AsyncEngine(engine)
    yield engine, async_engine
    async_engine.shutdown()


async def _collect(engine: AsyncEngine, prompt, params: SamplingParams, request_id: str):
    outputs = [out async for out in engine.generate(prompt, params, request_id)]
    return outputs


def _wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_generate_streams_cumulative_outputs_until_finished(toy):
    engine, async_engine = toy
    outputs = asyncio.run(_collect(async_engine, "abc", SamplingParams(max_tokens=5), "r1"))
    assert outputs[-1].finished and sum(o.finished for o in outputs) == 1
    texts = [o.outputs[0].text for o in outputs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # cumulative
    assert texts[-1] == expected_text("abc", 5) == "defgh"
    assert outputs[-1].outputs[0].finish_reason == "length"
    assert outputs[-1].prompt == "abc" and outputs[-1].prompt_token_ids == [97, 98, 99]
    assert len(engine.thread_ids) == 1 and threading.get_ident() not in engine.thread_ids


def test_outputs_are_snapshots_not_the_engines_lists(toy):
    """The toy engine appends to its lists in place; what a consumer holds must not change under it."""
    _, async_engine = toy

    async def run():
        seen = []
        async for out in async_engine.generate("a", SamplingParams(max_tokens=6), "r"):
            seen.append((out, list(out.outputs[0].token_ids)))
            await asyncio.sleep(0.01)  # let the engine run ahead
        return seen

    for out, ids_then in asyncio.run(run()):
        assert out.outputs[0].token_ids == ids_then


def test_many_concurrent_requests_complete_correctly(toy):
    engine, async_engine = toy
    prompts = [chr(ord("A") + i) * (i % 5 + 1) for i in range(40)]

    async def run():
        return await asyncio.gather(*[
            _collect(async_engine, p, SamplingParams(max_tokens=3 + i % 7), f"r{i}") for i, p in enumerate(prompts)
        ])

    results = asyncio.run(run())
    for i, (prompt, outputs) in enumerate(zip(prompts, results, strict=True)):
        assert outputs[-1].outputs[0].text == expected_text(prompt, 3 + i % 7)
    assert not engine.requests and len(engine.thread_ids) == 1


def test_rejected_request_raises_value_error_and_engine_keeps_serving(toy):
    _, async_engine = toy

    async def run():
        with pytest.raises(ValueError, match="max_model_len"):
            await _collect(async_engine, "x" * 60, SamplingParams(max_tokens=10), "too-long")
        with pytest.raises(ValueError, match="empty"):
            await async_engine.add_request("empty", [], SamplingParams())
        return await _collect(async_engine, "x", SamplingParams(max_tokens=2), "ok")

    assert asyncio.run(run())[-1].outputs[0].text == "yz"


def test_closing_the_generator_aborts_the_request(toy):
    engine, async_engine = toy
    recorder = Recorder()
    _listen(async_engine, recorder)

    async def run():
        agen = async_engine.generate("a", SamplingParams(max_tokens=50), "leaver")
        first = await agen.__anext__()
        await agen.aclose()  # what an HTTP disconnect does to the server's iterator
        return first

    first = asyncio.run(run())
    assert not first.finished
    _wait_until(lambda: "leaver" in engine.aborted)
    assert not engine.requests
    _wait_until(lambda: async_engine.get_stats().num_running == 0)
    _wait_until(lambda: recorder.finished and recorder.finished[-1].finish_reason == "abort")


def test_cancelled_consumer_task_aborts_the_request(toy):
    engine, async_engine = toy
    engine.step_delay = 0.01

    async def run():
        task = asyncio.create_task(_collect(async_engine, "a", SamplingParams(max_tokens=50), "cancelled"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    _wait_until(lambda: "cancelled" in engine.aborted)
    assert not engine.requests


def test_abort_by_id_ends_the_stream_with_abort(toy):
    engine, async_engine = toy
    engine.step_delay = 0.01

    async def run():
        outputs = []
        async for out in async_engine.generate("a", SamplingParams(max_tokens=50), "victim"):
            outputs.append(out)
            if len(outputs) == 2:
                await async_engine.abort("victim")
        return outputs

    outputs = asyncio.run(run())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert len(outputs[-1].outputs[0].token_ids) < 50 and "victim" in engine.aborted


def test_step_error_fails_requests_in_flight_and_later_requests_succeed(toy):
    engine, async_engine = toy

    async def run():
        engine.step_delay = 0.02
        running = asyncio.create_task(_collect(async_engine, "a", SamplingParams(max_tokens=20), "victim"))
        await asyncio.sleep(0.05)
        engine.fail_next_steps = 1
        with pytest.raises(EngineStepError, match="toy engine failure"):
            await running
        engine.step_delay = 0.001
        return await _collect(async_engine, "a", SamplingParams(max_tokens=3), "after")

    assert asyncio.run(run())[-1].outputs[0].text == "bcd"
    assert "victim" in engine.aborted and not async_engine.is_dead


def test_timing_is_recorded_for_metrics(toy):
    _, async_engine = toy
    recorder = Recorder()
    _listen(async_engine, recorder)
    asyncio.run(_collect(async_engine, "abc", SamplingParams(max_tokens=6, n=2), "timed"))
    _wait_until(lambda: recorder.finished)
    (timing,) = recorder.finished
    assert recorder.first == ["timed"] and recorder.threads and threading.get_ident() not in recorder.threads
    assert timing.num_prompt_tokens == 3 and timing.num_generation_tokens == 12  # n=2 samples of 6
    assert timing.finish_reason == "length"
    assert len(timing.inter_token_latencies) == 5 == recorder.num_inter_token
    assert 0 <= timing.time_to_first_token <= timing.e2e_latency
    assert timing.time_per_output_token == pytest.approx(sum(timing.inter_token_latencies) / 5)


def test_shutdown_fails_requests_and_rejects_new_ones():
    engine = ToyEngine(step_delay=0.01)
    async_engine = AsyncEngine(engine)

    async def run():
        running = asyncio.create_task(_collect(async_engine, "a", SamplingParams(max_tokens=50), "r"))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(RuntimeError, match="shut down"):
            await running
        with pytest.raises(RuntimeError, match="stopped"):
            await async_engine.add_request("late", "a", SamplingParams())

    asyncio.run(run())
    assert async_engine.is_dead



def test_client_cancelled_while_its_add_is_queued_does_not_kill_the_engine(toy):
    """Issue 11 point 1: the add is applied after its caller gave up; the loop must survive it."""
    engine, async_engine = toy
    gate = threading.Event()
    engine.step_gate = gate

    async def run():
        busy = asyncio.create_task(_collect(async_engine, "a", SamplingParams(max_tokens=3), "busy"))
        await asyncio.to_thread(engine.step_entered.wait, 5)  # the engine thread is now blocked in step()
        late = asyncio.create_task(async_engine.add_request("late", "b", SamplingParams(max_tokens=3)))
        while not async_engine._loop._commands:  # its AddRequest waits behind the step
            await asyncio.sleep(0.001)
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        gate.set()  # the step ends; the loop then applies the add nobody waits for, and its abort
        return await busy, await _collect(async_engine, "x", SamplingParams(max_tokens=2), "after")

    busy, after = asyncio.run(run())
    assert busy[-1].outputs[0].text == "bcd" and after[-1].outputs[0].text == "yz"
    assert not async_engine.is_dead
    _wait_until(lambda: "late" in engine.aborted)
    assert not engine.requests


def test_an_add_that_raises_fails_that_request_alone(toy):
    engine, async_engine = toy
    engine.fail_add_ids.add("bad")

    async def run():
        with pytest.raises(RuntimeError, match="cannot add bad"):
            await async_engine.add_request("bad", "a", SamplingParams(max_tokens=2))
        return await _collect(async_engine, "a", SamplingParams(max_tokens=2), "good")

    assert asyncio.run(run())[-1].outputs[0].text == "bc"
    assert not async_engine.is_dead


def test_a_request_id_in_flight_cannot_be_added_twice(toy):
    engine, async_engine = toy
    engine.step_delay = 0.01

    async def run():
        stream = await async_engine.add_request("dup", "a", SamplingParams(max_tokens=5))
        with pytest.raises(ValueError, match="request_id"):
            await async_engine.add_request("dup", "x", SamplingParams(max_tokens=5))
        return [out async for out in stream]

    assert asyncio.run(run())[-1].outputs[0].text == "bcdef"


def test_admission_bound_counts_unfinished_requests_in_the_front_end():
    """max_waiting_requests=2: a third unfinished request is refused at once; a finished or aborted one frees a slot."""
    async_engine = AsyncEngine(ToyEngine(step_delay=0.01), max_waiting_requests=2)

    async def main() -> None:
        long = SamplingParams(max_tokens=40)
        first = await async_engine.add_request("a", "abc", long)
        second = await async_engine.add_request("b", "abc", long)
        assert async_engine.num_unfinished_requests == 2
        with pytest.raises(EngineOverloadedError, match="--max-waiting-requests"):
            await async_engine.add_request("c", "abc", long)
        assert async_engine.num_unfinished_requests == 2  # the refused one left no trace
        first.abort()
        for _ in range(500):  # the slot frees when the engine reports the request ended
            if async_engine.num_unfinished_requests < 2:
                break
            await asyncio.sleep(0.01)
        third = await async_engine.add_request("c", "abc", SamplingParams(max_tokens=2))
        assert [o async for o in third][-1].outputs[0].text == expected_text("abc", 2)
        second.abort()

    try:
        asyncio.run(main())
    finally:
        async_engine.shutdown()


def test_abort_before_the_first_token_ends_the_stream_finished_and_empty(toy):
    engine, async_engine = toy
    engine.step_gate = threading.Event()

    async def run():
        busy = asyncio.create_task(_collect(async_engine, "z", SamplingParams(max_tokens=2), "busy"))
        await asyncio.to_thread(engine.step_entered.wait, 5)  # the engine thread is held inside a step
        task = asyncio.create_task(_collect(async_engine, "a", SamplingParams(max_tokens=5), "early"))
        await asyncio.sleep(0.1)  # its add is queued behind the step; the abort queues after it
        await async_engine.abort("early")
        engine.step_gate.set()
        await asyncio.wait_for(busy, 5)
        return await asyncio.wait_for(task, 5)

    outputs = asyncio.run(run())
    assert len(outputs) == 1 and outputs[0].finished is True and outputs[0].outputs == []
    assert outputs[0].request_id == "early" and outputs[0].prompt_token_ids == [ord("a")]


def test_engine_loop_runs_on_the_callers_thread_when_asked():
    """The engine core process runs the loop on its main thread (``start=False``): the steps happen on the
    thread that called ``run``, commands sent from another thread reach it, and Shutdown ends ``run``."""
    from pagedllm.engine import messages as m
    from pagedllm.engine.engine_loop import EngineLoop

    engine = ToyEngine()
    stepped_on: set[str] = set()
    step = engine.step

    def recording_step():
        stepped_on.add(threading.current_thread().name)
        return step()

    engine.step = recording_step
    seen: list = []
    loop = EngineLoop(engine, seen.append, start=False)
    assert loop.is_alive()

    def finished() -> bool:
        return any(isinstance(x, m.RequestOutputs) and any(o.finished for o in x.outputs) for x in seen)

    def drive():
        loop.send(m.AddRequest("r", [97, 98], SamplingParams(max_tokens=3)))
        deadline = time.monotonic() + 30  # then Shutdown anyway: the assertions below fail instead of a hang
        while time.monotonic() < deadline and not finished():
            time.sleep(0.01)
        loop.send(m.Shutdown())

    driver = threading.Thread(target=drive, name="driver")
    driver.start()
    loop.run()  # returns on Shutdown
    driver.join(10)
    assert stepped_on == {threading.current_thread().name} and not loop.is_alive()
    assert finished()
    loop.join(1)
    threaded = EngineLoop(ToyEngine(), seen.append)
    with pytest.raises(RuntimeError):
        threaded.run()  # a loop on its own thread is not run a second time
    threaded.send(m.Shutdown())
    threaded.join(10)
    assert not threaded.is_alive()
