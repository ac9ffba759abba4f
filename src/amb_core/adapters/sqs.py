"""AWSSQSBroker (aiobotocore): named in the API, implementation pending (see the README)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from amb_core.adapters._client import PlaceholderBroker


class AWSSQSBroker(PlaceholderBroker):
    client_module = "aiobotocore"
    extra = "aws"

    def __init__(
        self,
        region_name: str = "us-east-1",
        queue_name: str = "amb-messages",
        use_fifo: bool = False,
        endpoint_url: str | None = None,
        **options: object,
    ) -> None:
        self.region_name = region_name
        self.queue_name = queue_name
        self.use_fifo = use_fifo
        self.endpoint_url = endpoint_url
        self.options = options

    def __repr__(self) -> str:
        return (f"AWSSQSBroker(region_name={self.region_name!r}, queue_name={self.queue_name!r}, "
                f"use_fifo={self.use_fifo}, endpoint_url={self.endpoint_url!r})")

    @classmethod
    def from_url(cls, url: str) -> AWSSQSBroker:
        """``sqs://REGION/QUEUE?fifo=true&endpoint_url=http://127.0.0.1:5000``"""
        parts = urlsplit(url)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        return cls(
            region_name=parts.hostname or "us-east-1",
            queue_name=parts.path.strip("/") or "amb-messages",
            use_fifo=query.get("fifo", "").lower() in ("1", "true", "yes"),
            endpoint_url=query.get("endpoint_url"),
        )
