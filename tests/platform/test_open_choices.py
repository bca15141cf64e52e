"""FrontDoor.open_choices: the n choices of a request start together, and a failing choice
ends the others; a run settles what its choices made, even when its client leaves. The
generations here are stand-ins at the `open_generation` seam (the real ones run through Serve
in test_front_door.py); they record when each choice is first read."""

from __future__ import annotations

import asyncio

import pytest

from mixserve.platform.front_door import ApiError, Caller, FrontDoor, RequestRecord, Run
from mixserve.replicas.deployment import GenerateError, Progress
from mixserve.replicas.sampling_params import SamplingParams
from mixserve.replicas.sequence import RequestOutput


class Generation:
    """One choice. Like an in-process generation, it reaches the engine only when first read;
    it answers once every choice of the request has been read (the engine batching their
    prefills into one step), or with `error`."""

    def __init__(self, index: int, everyone_started: asyncio.Event, started: list[int], n: int,
                 error: GenerateError | None = None, door: FrontDoor | None = None):
        self.index, self.everyone_started, self.started, self.n, self.error = index, everyone_started, started, n, error
        self.cancelled = False
        self.read = False
        self.door = door
        self.arriving_at_first_read: int | None = None  # what an in-process engine hears with this request

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.read:
            raise StopAsyncIteration
        self.read = True
        self.arriving_at_first_read = self.door.arriving if self.door is not None else None
        self.started.append(self.index)
        if len(self.started) == self.n:
            self.everyone_started.set()
        if self.error is not None:
            return self.error
        await self.everyone_started.wait()
        return RequestOutput(f"r{self.index}", [1, 2], [7], "x", [7], "x", True, "length", None, None)

    def cancel(self) -> None:
        self.cancelled = True


def door_with(mixtral_dir, n: int, failing: int | None = None) -> tuple[FrontDoor, list[Generation]]:
    generations: list[Generation] = []
    everyone_started, started = asyncio.Event(), []

    def open_generation(request) -> Generation:
        i = len(generations)
        error = GenerateError("invalid_request", "bad choice", "prompt") if i == failing else None
        generations.append(Generation(i, everyone_started, started, n, error, door))
        return generations[-1]

    door = FrontDoor(open_generation, ledger=None, router=None, model_name="tiny", checkpoint=mixtral_dir,
                     tenants=[], first_output_timeout_s=3.0)
    return door, generations


def test_every_choice_starts_before_any_first_output_is_awaited(mixtral_dir):
    async def scenario():
        door, generations = door_with(mixtral_dir, n=3)
        choices = await door.open_choices(Caller("a"), [1, 2], SamplingParams(max_tokens=1), n=3, chat=False)
        return choices, generations

    # Read one by one, choice 0 would wait for choices 1 and 2 to start, which only start after
    # it answers: the request would time out with a 503 instead.
    choices, generations = asyncio.run(scenario())
    assert [g.read for g in generations] == [True, True, True]
    assert [first.request_id for first in choices._firsts] == ["r0", "r1", "r2"]
    assert not any(g.cancelled for g in generations)


def test_a_failing_choice_ends_the_others_with_its_error(mixtral_dir):
    async def scenario():
        door, generations = door_with(mixtral_dir, n=3, failing=1)
        with pytest.raises(ApiError) as raised:
            await door.open_choices(Caller("a"), [1, 2], SamplingParams(max_tokens=1), n=3, chat=False)
        return raised.value, generations

    error, generations = asyncio.run(scenario())
    assert error.status == 400 and "bad choice" in error.message
    assert all(g.cancelled for g in generations)


def test_the_door_counts_requests_on_their_way_until_each_generation_is_handed_over(mixtral_dir):
    async def scenario():
        door, generations = door_with(mixtral_dir, n=3)
        with door.arrival() as arrival, door.arrival():  # this request, and another just come in
            assert door.arriving == 2
            await door.open_choices(Caller("a"), [1, 2], SamplingParams(max_tokens=1), n=3, chat=False,
                                    arrival=arrival)
            after_open = door.arriving
        return door.arriving, after_open, [g.arriving_at_first_read for g in generations]

    at_end, after_open, heard = asyncio.run(scenario())
    # Each choice is handed over as it is read: the engine hears of the other request, and of
    # this request's choices still to come.
    assert heard == [3, 2, 1]
    assert after_open == 1 and at_end == 0  # the other request never came through: forgotten on leaving


def test_a_refused_request_stops_counting_as_on_its_way(mixtral_dir):
    async def scenario():
        door, _ = door_with(mixtral_dir, n=2, failing=0)
        with pytest.raises(ApiError):
            with door.arrival() as arrival:
                await door.open_choices(Caller("a"), [1, 2], SamplingParams(max_tokens=1), n=2, chat=False,
                                        arrival=arrival)
        return door.arriving

    assert asyncio.run(scenario()) == 0


class NonStreamedChoice:
    """A non-streamed choice as a replica sends it: its first output, then counts, then (here)
    nothing until the client leaves."""

    def __init__(self):
        self.cancelled = False
        self._items = [RequestOutput("r0", [1, 2], [7], "x", [7], "x", False, None, None, None), Progress(5), Progress(40)]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._items:
            return self._items.pop(0)
        await asyncio.Event().wait()  # generating on: the client leaves first

    def cancel(self) -> None:
        self.cancelled = True


def test_a_client_leaving_a_non_streamed_request_is_charged_the_tokens_made_so_far(mixtral_dir):
    choice = NonStreamedChoice()
    door = FrontDoor(lambda request: choice, ledger=None, router=None, model_name="tiny", checkpoint=mixtral_dir, tenants=[])
    settled: list[RequestRecord] = []
    door.settle = lambda lease, record: settled.append(record)

    async def scenario():
        choices = await door.open_choices(Caller("a"), [1, 2], SamplingParams(max_tokens=100), n=1, chat=False, stream=False)
        run = Run(door, "lease-1", RequestRecord("completions", prompt_tokens=2), choices)
        waiting = asyncio.create_task(run.finals())
        for _ in range(100):  # until the counts are read
            await asyncio.sleep(0.01)
            if not choice._items:
                break
        await asyncio.sleep(0.05)
        waiting.cancel()  # the client leaves
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(scenario())
    assert choice.cancelled  # its generation aborts, freeing the slot
    assert len(settled) == 1 and settled[0].status == "client_closed"
    assert settled[0].completion_total == 40  # not the first output's 1 token


def test_a_final_output_that_adds_no_token_still_sets_the_count():
    record = RequestRecord("completions", prompt_tokens=2)
    record.completion_tokens[0] = 40  # a Progress
    record.saw(0, RequestOutput("r0", [1, 2], list(range(41)), "x", [], "", True, "stop", None, None))
    assert record.completion_total == 41
