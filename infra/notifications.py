"""Bucket notifications through the S3 API: an SNS-style topic pushing to the ingest receiver, then
``PutBucketNotificationConfiguration``. Idempotent: Ceph *adds* configurations instead of replacing them,
so the current configuration is read first."""

from __future__ import annotations

import logging
from typing import Any

import boto3

from bucketlens.settings import Settings

log = logging.getLogger(__name__)
EVENTS = ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]


def ensure_bucket(s3: Any, bucket: str) -> None:
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)


def notification_id(settings: Settings) -> str:
    """The bucket notification's Id: one per namespace, so that a second deployment's (README, "Moving an index
    from FAISS to Milvus") can be removed alone (a stack set up before keeps its "bucketlens")."""
    return f"bucketlens-{settings.namespace}"


def ensure_notifications(settings: Settings, s3: Any, push_endpoint: str) -> str:
    """Create (or update) the persistent topic and bind it to the bucket; returns the topic ARN."""
    sns = boto3.client(
        "sns",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
    )
    # Persistent: radosgw queues events while the receiver is down or answers 5xx, and redelivers them.
    arn: str = sns.create_topic(
        Name=f"{settings.namespace}-{settings.bucket}",
        Attributes={"push-endpoint": push_endpoint, "persistent": "true"},
    )["TopicArn"]
    current = s3.get_bucket_notification_configuration(Bucket=settings.bucket)
    if any(t.get("TopicArn") == arn for t in current.get("TopicConfigurations", [])):
        return arn
    s3.put_bucket_notification_configuration(
        Bucket=settings.bucket,
        NotificationConfiguration={"TopicConfigurations": [{"Id": notification_id(settings), "TopicArn": arn,
                                                            "Events": EVENTS}]},
    )
    log.info("bucket %s now notifies %s", settings.bucket, arn)
    return arn
