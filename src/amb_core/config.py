"""Which broker the environment names: :meth:`AgentMessageBus.from_env` and the ``amb`` command.

Precedence, first match wins:

1. ``AMB_URL``: any broker URL the bus knows (``redis://``, ``nats://``, ``amqp://``, ``memory://``
   ...). It always wins, so it also settles a machine that has several brokers configured.
2. Exactly one broker-specific variable, as docker-compose files and hosting platforms set them:
   ``REDIS_URL`` (``redis://``/``rediss://``), ``NATS_URL`` (``nats://``/``tls://``; a
   comma list ``nats://a:4222,nats://b:4222`` as the NATS tools take it), ``RABBITMQ_URL`` or
   ``AMQP_URL`` (``amqp://``/``amqps://``; two names of one broker, so both may be set if they
   agree), ``KAFKA_SERVERS`` (``host:port[,host:port]``, becomes ``kafka://host:port,...``).
   More than one of them and no ``AMB_URL`` is ambiguous: ``ValueError`` naming them.
3. None of them: ``memory://``, the in-process broker. :meth:`AgentMessageBus.from_env` logs a
   warning then, because a service that forgot its configuration would otherwise talk only to
   itself; ``AMB_URL=memory://`` chooses it on purpose, without the warning.

A variable set to an empty or blank value counts as unset. Errors name the variable and mask
passwords.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from amb_core.broker import mask_url

logger = logging.getLogger(__name__)

MEMORY_URL = "memory://"
AMB_URL = "AMB_URL"
BROKER_VARIABLES: dict[str, tuple[str, ...]] = {
    # variable -> the URL schemes it may hold (KAFKA_SERVERS holds host:port pairs)
    "REDIS_URL": ("redis", "rediss"),
    "NATS_URL": ("nats", "tls"),
    "RABBITMQ_URL": ("amqp", "amqps"),
    "AMQP_URL": ("amqp", "amqps"),
    "KAFKA_SERVERS": (),
}
ALIASES = ("RABBITMQ_URL", "AMQP_URL")  # two names of one broker
ENV_VARIABLES = (AMB_URL, *BROKER_VARIABLES)


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def url_from_env(environ: Mapping[str, str] = os.environ, *, warn: bool = False) -> str:
    """The broker URL ``environ`` names, by the precedence in this module's docstring.

    ``warn``: log a warning when nothing is set and the answer is the in-memory broker.
    """
    url = _get(environ, AMB_URL)
    if url is not None:
        return url
    found = {name: value for name in BROKER_VARIABLES if (value := _get(environ, name))}
    if all(name in found for name in ALIASES):
        if found[ALIASES[0]] != found[ALIASES[1]]:
            raise ValueError(
                f"{ALIASES[0]} and {ALIASES[1]} name different RabbitMQ brokers "
                f"({mask_url(found[ALIASES[0]])!r}, {mask_url(found[ALIASES[1]])!r}); "
                f"unset one or set {AMB_URL}"
            )
        del found[ALIASES[1]]
    if len(found) > 1:
        raise ValueError(
            f"ambiguous broker configuration: {', '.join(sorted(found))} are all set; set "
            f"{AMB_URL} to the one to use (it takes precedence) or unset the others"
        )
    if not found:
        if warn:
            logger.warning(
                "none of %s is set: using the in-memory broker, which reaches only this process "
                "(set AMB_URL=memory:// to choose it on purpose)", ", ".join(ENV_VARIABLES),
            )
        return MEMORY_URL
    ((name, value),) = found.items()
    if name == "KAFKA_SERVERS":
        return _kafka_url(value)
    url = _nats_url(value) if name == "NATS_URL" else value
    scheme = urlsplit(url).scheme.lower()
    if scheme not in BROKER_VARIABLES[name]:
        expected = " or ".join(f"{s}://" for s in BROKER_VARIABLES[name])
        raise ValueError(f"{name}={mask_url(value)!r} is not a {expected} URL")
    return url


def _nats_url(value: str) -> str:
    """``nats://a:4222,nats://b:4222`` (the NATS tools' list) -> ``nats://a:4222,b:4222``."""
    first, *others = (part.strip() for part in value.split(",") if part.strip())
    hosts = [part.split("://", 1)[-1] for part in others]
    return ",".join([first, *hosts])


def _kafka_url(value: str) -> str:
    servers = [part.strip() for part in value.split(",") if part.strip()]
    if any("://" in server for server in servers):
        raise ValueError(
            f"KAFKA_SERVERS={mask_url(value)!r}: give host:port pairs separated by commas "
            "(no scheme), or set AMB_URL=kafka://host:port"
        )
    return "kafka://" + ",".join(servers)
