"""Connections from the URL, and redis-py's exceptions mapped to amb's once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from amb_core.adapters._client import require
from amb_core.errors import BrokerConnectionError
from amb_core.runtime import ErrorMap
from amb_core.runtime.errors import Mapping

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection, ConnectionPool


def connection_errors() -> tuple[type[BaseException], ...]:
    """What a lost, refused or timed-out connection raises (redis-py's and the builtins)."""
    exceptions = require("redis.exceptions", "redis")
    return (exceptions.ConnectionError, exceptions.TimeoutError, OSError, TimeoutError,
            exceptions.ClusterDownError, exceptions.SlotNotCoveredError)


def _mapping() -> Mapping:
    return [(connection_errors(), BrokerConnectionError)]


ERRORS = ErrorMap("RedisBroker", _mapping)
"""redis-py's connection errors (refused, lost, timed out, authentication) are
:class:`BrokerConnectionError`; a ``ResponseError`` (the server refused a command) stays what it
is, so callers see the server's own words."""


def make(pool: Any) -> AbstractConnection:
    """A connection of its own from a pool's settings (not checked out of the pool)."""
    conn: AbstractConnection = pool.make_connection()
    return conn


async def connect(conn: Any) -> None:
    """``conn.connect()`` (untyped in redis-py)."""
    await conn.connect()


class Pools:
    """Connection factories from the URL: ``writer`` and ``client`` with socket_timeout, and
    ``reader`` for blocking reads (no socket timeout on pub/sub; group readers' BLOCK is
    bounded by block_timeout and the read by block_timeout + socket_timeout).

    On a Redis Cluster (:meth:`use_cluster`, chosen at connect) ``client`` becomes redis-py's
    ``RedisCluster`` (it routes each command by its key's slot and follows ``MOVED``), and
    :meth:`node` gives the same writer and reader factories for any one node."""

    def __init__(self, url: str, *, connect_timeout: float, socket_timeout: float,
                 block_timeout: float) -> None:
        redis = require("redis.asyncio", "redis")
        self.url = url
        self.socket_timeout = socket_timeout
        self.block_timeout = block_timeout
        self.common: dict[str, Any] = {
            "decode_responses": False,
            "socket_connect_timeout": connect_timeout,
            "socket_keepalive": True,
            "protocol": 2,
        }
        common = self.common
        self.writer: ConnectionPool = redis.ConnectionPool.from_url(
            url, socket_timeout=socket_timeout, **common)
        self.reader: ConnectionPool = redis.ConnectionPool.from_url(
            url, socket_timeout=block_timeout + socket_timeout, **common)
        self.client: Any = redis.Redis(connection_pool=redis.ConnectionPool.from_url(
            url, socket_timeout=socket_timeout, **common))
        self.nodes: dict[tuple[str, int], tuple[ConnectionPool, ConnectionPool]] = {}

    async def use_cluster(self) -> None:
        """Replace ``client`` by a ``RedisCluster`` that has discovered the cluster's slots."""
        cluster = require("redis.asyncio.cluster", "redis")
        client = cluster.RedisCluster.from_url(self.url, socket_timeout=self.socket_timeout,
                                               **self.common)
        try:
            await client.initialize()
        except BaseException:
            await client.aclose()
            raise
        await self.client.aclose()
        self.client = client

    def node(self, host: str, port: int) -> tuple[ConnectionPool, ConnectionPool]:
        """(writer, reader) connection factories for one node of the cluster, with the URL's
        other settings (password, TLS, timeouts)."""
        pools = self.nodes.get((host, port))
        if pools is None:
            asyncio_connection = require("redis.asyncio.connection", "redis")
            options: dict[str, Any] = dict(asyncio_connection.parse_url(self.url))
            options.update(host=host, port=port, **self.common)
            options.pop("db", None)
            pools = self.nodes[(host, port)] = (
                asyncio_connection.ConnectionPool(socket_timeout=self.socket_timeout,
                                                  **options),
                asyncio_connection.ConnectionPool(
                    socket_timeout=self.block_timeout + self.socket_timeout, **options),
            )
        return pools

    async def close(self) -> None:
        await self.client.aclose()
        await self.writer.disconnect()
        await self.reader.disconnect()
        for writer, reader in self.nodes.values():
            await writer.disconnect()
            await reader.disconnect()
