"""Bodies stream both ways with bounded memory (DESIGN §5): 200 MiB up and down through a
real gateway process, whose peak RSS must grow by less than 50 MiB."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.backends import pattern_sha256
from tests.conftest import upstream

from .conftest import StartGateway

SIZE = 200 * 1024 * 1024
MAX_GROWTH_KIB = 50 * 1024

YAML = """
defaults: {{auth: none, timeout: 30s}}
limits: {{max_body: 1GiB}}
services:
  big: {{upstreams: ["{upstream}"]}}
"""


async def _chunks(total: int, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        piece = block[: min(size, total - sent)]
        sent += len(piece)
        yield piece


def _upload_sha(total: int, size: int = 256 * 1024) -> str:
    digest = hashlib.sha256()
    block = bytes(range(256)) * (size // 256)
    sent = 0
    while sent < total:
        piece = block[: min(size, total - sent)]
        digest.update(piece)
        sent += len(piece)
    return digest.hexdigest()


@pytest.mark.slow
async def test_200_mib_up_and_down_with_bounded_gateway_memory(
    start_gateway: StartGateway, backend: TestServer
) -> None:
    gateway = start_gateway(YAML.format(upstream=upstream(backend)))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(f"{gateway.url}/api/big/download/1024") as warm:
            await warm.read()
        baseline = gateway.memory_kib("VmRSS")

        async with session.post(f"{gateway.url}/api/big/upload", data=_chunks(SIZE)) as response:
            assert response.status == 200
            assert await response.json() == {"length": SIZE, "sha256": _upload_sha(SIZE)}

        digest, received = hashlib.sha256(), 0
        async with session.get(f"{gateway.url}/api/big/download/{SIZE}") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(SIZE)
            async for chunk in response.content.iter_any():
                digest.update(chunk)
                received += len(chunk)
        assert received == SIZE
        assert digest.hexdigest() == pattern_sha256(SIZE)

    growth = gateway.memory_kib("VmHWM") - baseline
    print(f"gateway RSS: baseline {baseline} KiB, peak growth {growth} KiB for 2 x {SIZE >> 20} MiB")
    assert growth < MAX_GROWTH_KIB


async def test_client_that_disconnects_mid_download_leaves_the_gateway_serving(
    start_gateway: StartGateway, backend: TestServer
) -> None:
    gateway = start_gateway(YAML.format(upstream=upstream(backend)))
    async with aiohttp.ClientSession() as session:
        response = await session.get(f"{gateway.url}/api/big/download/{SIZE}")
        await response.content.readexactly(1024 * 1024)
        response.close()  # drop the connection with most of the body unread
        await asyncio.sleep(0.2)
        async with session.get(f"{gateway.url}/api/big/status/200") as again:
            assert again.status == 200
    assert gateway.process.poll() is None
