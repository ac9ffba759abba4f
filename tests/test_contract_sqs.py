"""The contract suite on SQS + SNS (+ S3), against a moto server the tests start on loopback.

moto is slow (about 150 messages/s end to end) and its calls get slower as a queue grows: the
server is reset before each test (``/moto-api/reset``), and waits are longer than on the other
brokers (``wait``). docs/sqs.md lists the skips and what only a real AWS account can show.
"""

from __future__ import annotations

import pytest
from tests.moto_servers import MotoServer, moto_server, private_moto  # noqa: F401

from amb_core.adapters import AWSSQSBroker
from amb_core.testing import BrokerContract

BUCKET = "amb-large-payloads"


def sqs_broker(server_url: str, **options: object) -> AWSSQSBroker:
    options.setdefault("visibility_timeout", 5)
    options.setdefault("wait_time_seconds", 2)
    options.setdefault("queue_name", "amb-test")
    return AWSSQSBroker(region_name="us-east-1", endpoint_url=server_url,  # type: ignore[arg-type]
                        **options)


sqs_broker.__test__ = False  # type: ignore[attr-defined]


async def raw_sqs_publish(broker_url: str, topic: str, body: bytes,
                          headers: dict[str, str], queue_name: str = "amb-test",
                          fifo: bool = False) -> None:
    """Publish as a plain SNS client would: the amb topic in the ``amb-topic`` attribute,
    headers as string attributes, a body that is not text base64'd with
    ``amb-body-encoding: base64`` (SNS and SQS bodies must be text)."""
    import base64

    from aiobotocore.session import get_session

    attributes = {"amb-topic": {"DataType": "String", "StringValue": topic}}
    attributes.update({k: {"DataType": "String", "StringValue": v} for k, v in headers.items()})
    try:
        text = body.decode()
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", body, 0, 1, "NUL is not SQS text")
    except UnicodeDecodeError:
        text = base64.b64encode(body).decode()
        attributes["amb-body-encoding"] = {"DataType": "String", "StringValue": "base64"}
    async with get_session().create_client("sns", region_name="us-east-1",
                                           endpoint_url=broker_url) as sns:
        name = queue_name + (".fifo" if fifo else "")
        topic_attributes = {"FifoTopic": "true", "ContentBasedDeduplication": "false"} \
            if fifo else {}
        arn = (await sns.create_topic(Name=name, Attributes=topic_attributes))["TopicArn"]
        extra = {"MessageGroupId": "foreign", "MessageDeduplicationId": str(id(body))} \
            if fifo else {}
        await sns.publish(TopicArn=arn, Message=text, MessageAttributes=attributes, **extra)


class TestSQSContract(BrokerContract):
    wait = 20.0
    redelivery_wait = 30.0
    volume = 0.1  # moto answers at about 150 messages/s (docs/sqs.md): the bulk cases at 1/10
    options: dict[str, object] = {}

    @pytest.fixture(autouse=True)
    def _reset(self, moto_server: MotoServer) -> None:  # noqa: F811
        moto_server.reset()

    @pytest.fixture
    def broker_factory(self, moto_server: MotoServer):  # noqa: F811
        return lambda: sqs_broker(moto_server.url, **self.options)

    @pytest.fixture
    def raw_publish(self, moto_server: MotoServer):  # noqa: F811
        async def publish(topic: str, body: bytes, headers: dict[str, str]) -> None:
            await raw_sqs_publish(moto_server.url, topic, body, headers,
                                  fifo=bool(self.options.get("use_fifo")))
        return publish

    @pytest.fixture
    def restartable(self, private_moto: MotoServer):  # noqa: F811
        return (lambda: sqs_broker(private_moto.url, **self.options)), private_moto.restart


class TestSQSFifoContract(TestSQSContract):
    """FIFO topic and queues (``use_fifo=True``): ordering per key (``MessageGroupId``), so
    the ordering case runs here."""

    options = {"use_fifo": True}


class TestSQSLargePayloadContract(TestSQSContract):
    """With ``large_payload_bucket``: no payload limit (bodies over SNS's go to moto S3)."""

    options = {"large_payload_bucket": BUCKET}

    @pytest.fixture(autouse=True)
    def _reset(self, moto_server: MotoServer) -> None:  # noqa: F811
        import urllib.request

        moto_server.reset()
        request = urllib.request.Request(f"{moto_server.url}/{BUCKET}", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass
