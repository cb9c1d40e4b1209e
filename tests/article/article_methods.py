"""The article's four ways to query Azure OpenAI with prompts from a Spark DataFrame, defects kept.

These are copies to test against, not code to use. The set-up (globals ``api_url``, ``api_key``,
``certificate_path``, ``ssl_context`` built once with ``ssl.create_default_context(cafile=...)``) and
the body of ``query_gpt4`` follow the article's code; the other three methods are reproduced from
its description and the behaviour recorded in issue 3. Only the plumbing is adapted: the globals
live in an :class:`ArticleEndpoint` pointed at the mock server (Azure URL form, ``api-key`` header,
the mock's CA), and the DataFrame steps around each method become their plain-Python equivalents
on ``(row_id, prompt)`` rows (what the driver holds after ``collect()`` / ``toPandas()``); the
article's ``nest_asyncio.apply()`` + ``loop.run_until_complete`` becomes ``asyncio.run``.

What is kept on purpose (each is shown by ``tests/integration/test_article_defects.py``):

1. ``query_gpt4`` (the UDF body): a new connection per row (``requests.post``, no session), no
   retry, no timeout; an HTTP error comes back as the row's "answer" (``"Error: 500, ..."``), and a
   connection reset or a malformed 200 raises (in Spark: the task, then the job, fails).
2. ``async_batch_method``: ``asyncio.gather`` over ``api_call_batch_size`` prompts without status
   check or ``return_exceptions``: one 500 (``KeyError: 'choices'``) kills the whole run; each batch
   waits for its slowest row.
3. ``async_semaphore_method``: one task per row created up front; each answer is appended to a
   shared list in completion order, and the list is zipped with the ids by position: when answers
   complete out of order, rows get other rows' answers.
4. ``thread_method``: every row submitted up front to a ``ThreadPoolExecutor``; a row whose request
   raised is printed and never appended, and the inner join on ``id`` then drops it from the output.
"""

from __future__ import annotations

import asyncio
import ssl
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from threading import Lock
from typing import Any

import aiohttp
import requests

API_VERSION = "2023-05-15"
API_MODEL = "gpt-4"
SYSTEM_PROMPT = "You are a helpful assistant."

Row = tuple[Any, str]


@dataclass(frozen=True)
class ArticleEndpoint:
    """The article's module globals, gathered so that a test can point them at the mock server."""

    api_url: str
    api_key: str = field(repr=False)
    certificate_path: str
    ssl_context: ssl.SSLContext


def article_endpoint(
    api_base: str,
    api_key: str,
    certificate_path: str,
    api_model: str = API_MODEL,
    api_version: str = API_VERSION,
) -> ArticleEndpoint:
    """``api_url`` as the article builds it; the SSL context is built once, as in the article."""
    api_url = f"{api_base}/openai/deployments/{api_model}/chat/completions?api-version={api_version}"
    return ArticleEndpoint(
        api_url, api_key, certificate_path, ssl.create_default_context(cafile=certificate_path)
    )


# --- Method 1: synchronous API calls in a Spark UDF ---------------------------------------------


def query_gpt4(prompt: str, ep: ArticleEndpoint) -> str:
    """The UDF body: generic function to query the API with ``requests``."""
    # Headers for the API request
    headers = {"Content-Type": "application/json", "api-key": f"{ep.api_key}"}
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    data = {"model": API_MODEL, "messages": messages}
    # Make the API request
    response = requests.post(ep.api_url, headers=headers, json=data, verify=ep.certificate_path)
    # Check for successful response
    if response.status_code == 200:
        return str(response.json()["choices"][0]["message"]["content"])
    else:
        return f"Error: {response.status_code}, {response.text}"


def udf_method(rows: list[Row], ep: ArticleEndpoint) -> list[tuple[Any, str]]:
    """``df.repartition(30).withColumn("response", query_gpt4_udf(F.col("prompt")))``, row by row."""
    return [(row_id, query_gpt4(prompt, ep)) for row_id, prompt in rows]


# --- Method 2: asynchronous API calls with asyncio.gather, in batches ----------------------------


async def query_gpt4_async(session: aiohttp.ClientSession, prompt: str, ep: ArticleEndpoint) -> str:
    headers = {"Content-Type": "application/json", "api-key": f"{ep.api_key}"}
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    data = {"model": API_MODEL, "messages": messages}
    async with session.post(ep.api_url, headers=headers, json=data, ssl=ep.ssl_context) as response:
        result = await response.json()
        return str(result["choices"][0]["message"]["content"])


async def process_batch(prompts: list[str], ep: ArticleEndpoint) -> list[str]:
    async with aiohttp.ClientSession() as session:
        tasks = [query_gpt4_async(session, prompt, ep) for prompt in prompts]
        return await asyncio.gather(*tasks)


def async_batch_method(
    rows: list[Row], ep: ArticleEndpoint, api_call_batch_size: int = 128
) -> list[tuple[Any, str]]:
    """Prompts collected to the driver, sent ``api_call_batch_size`` at a time, zipped back with the ids."""
    ids = [row_id for row_id, _ in rows]
    prompts = [prompt for _, prompt in rows]
    responses: list[str] = []
    for i in range(0, len(prompts), api_call_batch_size):
        batch = prompts[i : i + api_call_batch_size]
        responses.extend(asyncio.run(process_batch(batch, ep)))
    return list(zip(ids, responses, strict=False))


# --- Method 3: asynchronous API calls limited by a semaphore --------------------------------------


async def fetch_with_semaphore(
    semaphore: asyncio.Semaphore,
    session: aiohttp.ClientSession,
    prompt: str,
    responses: list[str],
    ep: ArticleEndpoint,
) -> None:
    async with semaphore:
        response = await query_gpt4_async(session, prompt, ep)
        responses.append(response)


async def process_all(prompts: list[str], ep: ArticleEndpoint, max_concurrent_requests: int) -> list[str]:
    semaphore = asyncio.Semaphore(max_concurrent_requests)
    responses: list[str] = []
    async with aiohttp.ClientSession() as session:
        tasks = [fetch_with_semaphore(semaphore, session, prompt, responses, ep) for prompt in prompts]
        await asyncio.gather(*tasks)
    return responses


def async_semaphore_method(
    rows: list[Row], ep: ArticleEndpoint, max_concurrent_requests: int = 32
) -> list[tuple[Any, str]]:
    """Every prompt at once behind a semaphore; answers zipped with the ids by position."""
    ids = [row_id for row_id, _ in rows]
    prompts = [prompt for _, prompt in rows]
    responses = asyncio.run(process_all(prompts, ep, max_concurrent_requests))
    return list(zip(ids, responses, strict=False))  # pd.DataFrame({"id": ids, "response": responses})


# --- Method 4: ThreadPoolExecutor, then an inner join on id --------------------------------------


def process_row(row: Row, ep: ArticleEndpoint) -> dict[str, Any]:
    row_id, prompt = row
    response = query_gpt4(prompt, ep)
    return {"id": row_id, "response": response}


def thread_method(rows: list[Row], ep: ArticleEndpoint, num_workers: int = 32) -> list[tuple[Any, str]]:
    """Rows submitted up front; results gathered under a lock; ``df.join(results, "id", "inner")``."""
    results: list[dict[str, Any]] = []
    lock = Lock()
    with ThreadPoolExecutor(max_workers=num_workers) as executor:
        futures = [executor.submit(process_row, row, ep) for row in rows]
        for future in as_completed(futures):
            try:
                result = future.result()
                with lock:
                    results.append(result)
            except Exception as e:
                print(f"Error processing row: {e}")
    answered = {result["id"]: result["response"] for result in results}
    return [(row_id, answered[row_id]) for row_id, _ in rows if row_id in answered]  # the inner join


ARTICLE_METHODS = {
    "sync": udf_method,
    "async_batches": async_batch_method,
    "async_limited": async_semaphore_method,
    "thread_pool": thread_method,
}
