"""The contract suite on Azure Service Bus.

``TestAzureContract`` runs the adapter over the in-memory namespace of ``tests/azure_fake.py``
(no Service Bus endpoint can run here: the SDK signs in through a ``$cbs`` node that no local
broker provides, and the official emulator needs Docker). ``TestAzureLiveContract`` runs the
same suite against a real namespace (or the emulator) when
``AMB_AZURE_SERVICEBUS_CONNECTION_STRING`` is set, else it skips saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

pytest.importorskip("azure.servicebus", reason="azure-servicebus is not installed "
                    "(pip install 'amb-core[azure]')")

from tests.azure_fake import FakeNamespace

from amb_core.adapters import AzureServiceBusBroker
from amb_core.testing import BrokerContract

FAKE_CONNECTION = ("Endpoint=sb://fake.servicebus.windows.net/;SharedAccessKeyName=test;"
                   "SharedAccessKey=not-a-real-key=")
LIVE_ENV = "AMB_AZURE_SERVICEBUS_CONNECTION_STRING"
LIVE_TOPIC_ENV = "AMB_AZURE_SERVICEBUS_TOPIC"


def fake_broker(ns: FakeNamespace, **options: object) -> AzureServiceBusBroker:
    options.setdefault("topic_name", "amb-test")
    options.setdefault("receive_wait", 1.0)
    return AzureServiceBusBroker(  # type: ignore[arg-type]
        connection_string=FAKE_CONNECTION, client_factory=ns.client, admin_factory=ns.admin,
        **options,
    )


async def _delete_topic(connection: str, topic: str) -> None:
    from azure.servicebus.aio.management import ServiceBusAdministrationClient

    async with ServiceBusAdministrationClient.from_connection_string(connection) as admin:
        with contextlib.suppress(Exception):
            await admin.delete_topic(topic)


class TestAzureContract(BrokerContract):
    wait = 10.0

    @pytest.fixture
    def namespace(self) -> FakeNamespace:
        return FakeNamespace()

    @pytest.fixture
    def broker_factory(self, namespace: FakeNamespace):
        return lambda: fake_broker(namespace)

    @pytest.fixture
    def raw_publish(self, namespace: FakeNamespace, broker_factory):
        from azure.servicebus import ServiceBusMessage

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            broker = broker_factory()
            await broker.connect()  # makes the topic, as a deployment would have
            await broker.close()
            sender = namespace.client().get_topic_sender(topic_name="amb-test")
            async with sender:
                properties = dict(headers)
                content_type = properties.pop("content-type", None)
                properties["amb_topic"] = topic
                await sender.send_messages(ServiceBusMessage(
                    body, application_properties=properties, content_type=content_type))

        return publish

    @pytest.fixture
    def restartable(self, namespace: FakeNamespace):
        """A simulated restart at the SDK boundary (FakeNamespace.restart): every receiver's
        receive and the next send fail with ServiceBusConnectionError; messages are kept."""
        return (lambda: fake_broker(namespace)), namespace.restart


@pytest.mark.skipif(not os.environ.get(LIVE_ENV),
                    reason=f"{LIVE_ENV} is not set: no Service Bus namespace to run against "
                           "(the fake-backed TestAzureContract ran instead)")
class TestAzureLiveContract(BrokerContract):
    """Against a real namespace: the connection string needs Manage rights (the adapter makes
    the topic, subscriptions and rules). Group and keeper subscriptions made here delete
    themselves after an hour idle; each run uses its own topic unless
    ``AMB_AZURE_SERVICEBUS_TOPIC`` names one."""

    wait = 30.0
    redelivery_wait = 90.0

    @pytest.fixture(scope="class")
    def live_topic(self) -> Iterator[str]:
        named = os.environ.get(LIVE_TOPIC_ENV)
        topic = named or f"amb-contract-{uuid.uuid4().hex[:8]}"
        yield topic
        if not named:  # the run's own topic goes, with every subscription on it
            asyncio.run(_delete_topic(os.environ[LIVE_ENV], topic))

    @pytest.fixture
    def broker_factory(self, live_topic: str):
        connection = os.environ[LIVE_ENV]
        return lambda: AzureServiceBusBroker(connection_string=connection, topic_name=live_topic,
                                             group_idle_delete=3600.0)

    @pytest.fixture
    def raw_publish(self, live_topic: str, broker_factory):
        from azure.servicebus import ServiceBusMessage
        from azure.servicebus.aio import ServiceBusClient

        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            properties = dict(headers)
            content_type = properties.pop("content-type", None)
            properties["amb_topic"] = topic
            client = ServiceBusClient.from_connection_string(os.environ[LIVE_ENV])
            async with client, client.get_topic_sender(topic_name=live_topic) as sender:
                await sender.send_messages(ServiceBusMessage(
                    body, application_properties=properties, content_type=content_type))

        return publish
