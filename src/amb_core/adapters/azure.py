"""AzureServiceBusBroker (azure-servicebus): named in the API, implementation pending."""

from __future__ import annotations

import re

from amb_core.adapters._client import PlaceholderBroker

_SECRET = re.compile(r"(SharedAccessKey=)[^;]*", re.IGNORECASE)


class AzureServiceBusBroker(PlaceholderBroker):
    client_module = "azure.servicebus"
    extra = "azure"

    def __init__(self, connection_string: str, topic_name: str = "amb-messages",
                 **options: object) -> None:
        self.connection_string = connection_string
        self.topic_name = topic_name
        self.options = options

    def __repr__(self) -> str:
        masked = _SECRET.sub(r"\1***", self.connection_string)
        return (
            f"AzureServiceBusBroker(connection_string={masked!r}, topic_name={self.topic_name!r})"
        )

    @classmethod
    def from_url(cls, url: str) -> AzureServiceBusBroker:
        """``azuresb://<connection string>`` (everything after the scheme)."""
        return cls(connection_string=url.split("://", 1)[1])
