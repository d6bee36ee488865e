"""Send every (configuration, item) request to an OpenAI-compatible endpoint, a bounded number at once.

A failed request is recorded with its error and scored as a miss; nothing stops the run
but a server that cannot be reached at all.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass

import aiohttp

from h2o_vllm.evaluation.configs import EvalConfig
from h2o_vllm.evaluation.scenarios import Item


@dataclass
class Answer:
    config: str
    scenario: str
    key: str
    text: str | None  # None when the request failed
    error: str | None = None
    completion_tokens: int = 0
    seconds: float = 0.0


def request_body(item: Item, model: str, extra: dict) -> tuple[str, dict]:
    """(path, JSON body) of one greedy request."""
    body = {"model": model, "max_tokens": item.max_tokens, "temperature": 0.0, **extra}
    if item.ignore_eos:
        body["ignore_eos"] = True
    if item.messages is not None:
        return "/v1/chat/completions", {**body, "messages": item.messages}
    return "/v1/completions", {**body, "prompt": item.prompt}


def _text(path: str, reply: dict) -> str:
    choice = reply["choices"][0]
    return choice["message"]["content"] or "" if path.endswith("chat/completions") else choice["text"]


class Progress:
    """One line at most every ``every`` seconds, and at the end."""

    def __init__(self, total: int, every: float = 10.0, stream=None):
        self.total, self.every, self.stream = total, every, stream or sys.stderr
        self.done = self.failed = 0
        self.start = self.last = time.monotonic()

    def update(self, answer: Answer) -> None:
        self.done += 1
        self.failed += answer.error is not None
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(
                f"[eval] {self.done}/{self.total} requests, {self.failed} failed, "
                f"{now - self.start:.0f} s elapsed, ~{left:.0f} s left (last: {answer.config} {answer.scenario} {answer.key})",
                file=self.stream,
                flush=True,
            )


def server_root(base_url: str) -> str:
    """``http://host:port`` whether the user gave the root or the OpenAI ``/v1`` base."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


async def _one(
    session, base_url, config: EvalConfig, item: Item, model: str, select: str, api_key: str | None
) -> Answer:
    name, extra = config.request_fields(model, select)
    path, body = request_body(item, name, extra)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.monotonic()
    try:
        async with session.post(server_root(base_url) + path, json=body, headers=headers) as resp:
            payload = await resp.text()
            if resp.status != 200:
                return Answer(
                    config.name,
                    item.scenario,
                    item.key,
                    None,
                    f"HTTP {resp.status}: {payload[:300]}",
                    seconds=time.monotonic() - t0,
                )
            reply = json.loads(payload)
            return Answer(
                config.name,
                item.scenario,
                item.key,
                _text(path, reply),
                None,
                reply.get("usage", {}).get("completion_tokens", 0),
                time.monotonic() - t0,
            )
    except (TimeoutError, aiohttp.ClientError, KeyError, ValueError) as exc:
        return Answer(
            config.name, item.scenario, item.key, None, f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - t0
        )


def item_groups(jobs: list[tuple[EvalConfig, Item]]) -> list[list[int]]:
    """Indices of ``jobs`` grouped by item, in order of first appearance; in each group the first
    configuration without a ``cache_salt`` leads (the full cache, when it is run)."""
    groups: dict[int, list[int]] = {}
    for index, (_, item) in enumerate(jobs):
        groups.setdefault(id(item), []).append(index)
    for group in groups.values():
        group.sort(key=lambda i: jobs[i][0].cache_salt is not None)  # stable: salted ones last
    return list(groups.values())


async def _run(base_url, jobs, model, select, concurrency, timeout, api_key, progress) -> list[Answer]:
    """Every job, at most ``concurrency`` requests in flight. An item's leading request runs alone
    first and the item's other configurations after it, so that vLLM's prefix cache gives them the
    prompt it computed (in-flight requests share nothing) and each prompt is prefilled about once
    per cache salt, not once per configuration; at most ``concurrency`` items are open at once so
    the leader's blocks are still cached when the others arrive. Hits decide nothing
    (:meth:`Footprint.max_prefix_hit`), so answers do not depend on this order."""
    limit = asyncio.Semaphore(concurrency)
    open_items = asyncio.Semaphore(concurrency)
    answers: list[Answer | None] = [None] * len(jobs)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:

        async def guarded(index):
            config, item = jobs[index]
            async with limit:
                answer = await _one(session, base_url, config, item, model, select, api_key)
            progress.update(answer)
            answers[index] = answer

        async def item(group):
            async with open_items:
                await guarded(group[0])
                await asyncio.gather(*(guarded(i) for i in group[1:]))

        await asyncio.gather(*(item(g) for g in item_groups(jobs)))
    return answers


def run_requests(
    base_url: str,
    jobs: list[tuple[EvalConfig, Item]],
    model: str,
    *,
    select: str = "xargs",
    concurrency: int = 8,
    timeout: float = 1800.0,
    api_key: str | None = None,
) -> list[Answer]:
    """Answers in the order of ``jobs``. ``timeout`` bounds each request (seconds)."""
    progress = Progress(len(jobs))
    return asyncio.run(_run(base_url, jobs, model, select, concurrency, timeout, api_key, progress))
