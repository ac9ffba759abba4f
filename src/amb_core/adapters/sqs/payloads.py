"""Bodies too large for SNS/SQS go to S3, with the pointer AWS's extended client libraries use.

The message body is then the JSON array
``["software.amazon.payloadoffloading.PayloadS3Pointer", {"s3BucketName": B, "s3Key": K}]``
and the message attribute ``ExtendedPayloadSize`` (Number) carries the original size, as the
Java and Python SQS/SNS extended clients write and read it, so their consumers read ours and we
read theirs. Objects are not deleted on acknowledgement: with SNS fan-out several queues point
at the same object (give the bucket a lifecycle rule that expires them).
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

POINTER_CLASS = "software.amazon.payloadoffloading.PayloadS3Pointer"
SIZE_ATTRIBUTE = "ExtendedPayloadSize"
LEGACY_SIZE_ATTRIBUTE = "SQSLargePayloadSize"
_HEAD = '["' + POINTER_CLASS + '"'


class LargePayloads:
    """Store and load bodies in ``bucket`` (an S3 client from the broker's session)."""

    __slots__ = ("bucket", "prefix", "s3")

    def __init__(self, s3: Any, bucket: str, prefix: str = "") -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix

    @staticmethod
    def is_pointer(text: str) -> bool:
        return text.startswith(_HEAD) or (text.startswith("[") and POINTER_CLASS in text[:80])

    async def store(self, body: bytes) -> tuple[str, dict[str, Any]]:
        """Put ``body`` in S3; the pointer body and its size attribute."""
        key = f"{self.prefix}{uuid.uuid4()}"
        await self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
        pointer = orjson.dumps([POINTER_CLASS, {"s3BucketName": self.bucket, "s3Key": key}])
        return pointer.decode(), {SIZE_ATTRIBUTE: {"DataType": "Number",
                                                   "StringValue": str(len(body))}}

    async def load(self, text: str) -> bytes:
        try:
            kind, where = orjson.loads(text)
            bucket, key = where["s3BucketName"], where["s3Key"]
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError):
            return text.encode()  # looked like a pointer, is not one: the body as it is
        if kind != POINTER_CLASS:
            return text.encode()
        response = await self.s3.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as stream:
            data: bytes = await stream.read()
        return data
