"""Bucket notifications through the S3 API: an SNS-style topic pushing to the ingest receiver, then
``PutBucketNotificationConfiguration``. Idempotent: Ceph *adds* configurations instead of replacing them,
so the current configuration is read first.

Ceph copies the topic into a notification when the notification is put, and queues each event with the push
endpoint of its time: a topic updated alone changed nothing, and an event queued with an earlier webhook token
was refused (401) and sent again, hundreds of times a second, forever (Ceph 16 has no retry limit; an
independent check). A changed endpoint therefore takes the topic (and its queue) down and puts both again."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import boto3
import httpx
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from bucketlens.s3 import credentials
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


def topic_name(settings: Settings) -> str:
    """The bucket's topic: ``<namespace>-<bucket>``, the namespace's characters other than letters, digits, '.', '-'
    and '_' as '-' (Ceph named the topic of a namespace with a space "a+b-...", and one with ':' was never found by
    its ARN's last part, so a changed webhook token never reached the notification: review 61)."""
    return f"{re.sub(r'[^A-Za-z0-9._-]', '-', settings.namespace)}-{settings.bucket}"


def ensure_notifications(settings: Settings, s3: Any, push_endpoint: str) -> bool:
    """Create (or update) the persistent topic and bind it to the bucket. Returns whether events queued for an
    earlier endpoint were dropped with it (a reconcile finds the uploads they named). Another bucketlens
    notification of the bucket that pushes to the same receiver (a namespace used before) is removed: each upload
    was delivered, queued and embedded twice (an independent check)."""
    sns = _sns(settings)
    name = topic_name(settings)
    endpoints = _endpoints(sns)
    before = next((arn for arn in endpoints if arn.rsplit(":", 1)[-1] == name), "")
    old = endpoints.get(before)
    dropped = old is not None and unquote(old) != unquote(push_endpoint)
    if dropped:
        sns.delete_topic(TopicArn=before)
        log.warning("the push endpoint of %s changed: its topic and the events queued for the old endpoint were "
                    "dropped", name)
    # Persistent: radosgw queues events while the receiver is down or answers 5xx, and redelivers them.
    arn: str = sns.create_topic(
        Name=name,
        Attributes={"push-endpoint": push_endpoint, "persistent": "true"},
    )["TopicArn"]
    current = s3.get_bucket_notification_configuration(Bucket=settings.bucket).get("TopicConfigurations", [])
    ours = [c["Id"] for c in current if c.get("TopicArn") == arn]
    if dropped or not ours:
        s3.put_bucket_notification_configuration(  # (the same Id again replaces that notification)
            Bucket=settings.bucket,
            NotificationConfiguration={"TopicConfigurations": [{"Id": (ours or [notification_id(settings)])[0],
                                                                "TopicArn": arn, "Events": EVENTS}]},
        )
        log.info("bucket %s now notifies %s", settings.bucket, arn)
    for config in current:
        other = config.get("TopicArn")
        if (other != arn and str(config.get("Id", "")).startswith("bucketlens")
                and _receiver(endpoints.get(other)) == _receiver(push_endpoint)):
            remove_notifications(settings, settings.bucket, config["Id"])
            sns.delete_topic(TopicArn=other)
            log.warning("removed notification %s of bucket %s: it pushed to the same receiver", config["Id"],
                        settings.bucket)
    return dropped


def notified(settings: Settings, s3: Any, push_endpoint: str, timeout_s: float | None = None) -> bool:
    """Whether the bucket has a notification whose topic pushes to ``push_endpoint`` (someone may have removed it,
    or the bucket, since ``ensure_notifications``: the supervisor asks before it takes a stall for radosgw's);
    ``timeout_s``: each call's, tried once (a frozen radosgw must not hold the supervisor)."""
    endpoints = _endpoints(_sns(settings, timeout_s))
    configs = s3.get_bucket_notification_configuration(Bucket=settings.bucket).get("TopicConfigurations", [])
    return any(unquote(endpoints.get(c.get("TopicArn")) or "") == unquote(push_endpoint) for c in configs)


def follow_endpoint(settings: Settings, s3: Any, push_endpoint: str) -> list[str]:
    """Put again the notifications of the other buckets this namespace was set up for (a ``BUCKETLENS_BUCKET`` used
    before: the index holds them too) that push to another endpoint: an earlier webhook token (ingest refused their
    events, 401, from then on, silently: review 48), ingest host or port. A notification of the Id bucketlens used
    before namespaces is followed only when it pushes to this receiver. One made by hand that pushes to this receiver
    with another token is named in a warning: its events are refused (review 67). Best effort, bucket by bucket: a
    bucket that cannot be read or put is named in a warning. Ceph only (``_endpoints`` needs its SNS). Returns those
    followed."""
    endpoints = _endpoints(_sns(settings))
    followed = []
    for bucket in sorted({b["Name"] for b in s3.list_buckets().get("Buckets", [])}):  # (this one's is put already)
        try:
            configs = s3.get_bucket_notification_configuration(Bucket=bucket).get("TopicConfigurations", [])
            for config in configs:
                endpoint = endpoints.get(config.get("TopicArn"))
                ours = config.get("Id") == notification_id(settings) or (
                    config.get("Id") == "bucketlens" and _receiver(endpoint) == _receiver(push_endpoint))
                if ours and endpoint and unquote(endpoint) != unquote(push_endpoint):
                    ensure_notifications(dataclasses.replace(settings, bucket=bucket), s3, push_endpoint)
                    followed.append(bucket)
                    break
                if endpoint and _receiver(endpoint) == _receiver(push_endpoint) and unquote(endpoint) != unquote(
                        push_endpoint):  # made by hand (README): not ours to change, and its events are refused
                    log.warning("notification %s of bucket %s pushes to this ingest with another webhook token (or "
                                "none): ingest refuses its events (401); put its topic %s again with the current "
                                "token, then run `bucketlens reconcile --bucket %s` (review 67)", config.get("Id"),
                                bucket, str(config.get("TopicArn")).rsplit(":", 1)[-1], bucket)
        except (ClientError, BotoCoreError, httpx.HTTPError) as exc:
            log.warning("the notification of bucket %s could not be put again (%s); its events may not reach ingest: "
                        "`bucketlens reconcile` finds what they named", bucket, exc)
    return followed


def remove_notifications(settings: Settings, bucket: str, notification: str = "") -> None:
    """Remove one notification of ``bucket`` by its Id, or all of them (Ceph's ``DELETE ?notification``: boto3 has
    no call for it). The Id percent-encoded: Ceph refused one with ':', ' ' or '+' sent as it is (403), which an
    earlier release's namespace could hold (review 61)."""
    url = f"{settings.s3_endpoint}/{bucket}?notification" + (f"={quote(notification, safe='')}" if notification else "")
    request = AWSRequest(method="DELETE", url=url)
    S3SigV4Auth(credentials(settings), "s3", settings.s3_region).add_auth(request)
    httpx.delete(url, headers=dict(request.headers), timeout=60).raise_for_status()


def _sns(settings: Settings, timeout_s: float | None = None) -> Any:
    config = None if timeout_s is None else Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                                                   retries={"total_max_attempts": 1, "mode": "standard"})
    return boto3.client("sns", endpoint_url=settings.s3_endpoint, aws_access_key_id=settings.s3_access_key or None,
                        aws_secret_access_key=settings.s3_secret_key or None, region_name=settings.s3_region,
                        config=config)  # (empty keys: boto3's own chain, as ``make_client`` and ``credentials``)


def _endpoints(sns: Any) -> dict[str, str | None]:
    """Each topic's ARN and push endpoint (None where the server names none: not Ceph)."""
    found: dict[str, str | None] = {}
    token = ""
    while True:
        page = sns.list_topics(**({"NextToken": token} if token else {}))
        for topic in page.get("Topics", []):
            if topic["TopicArn"] in found:  # (Ceph 16 lists each topic twice)
                continue
            attributes = sns.get_topic_attributes(TopicArn=topic["TopicArn"]).get("Attributes", {})
            try:
                found[topic["TopicArn"]] = json.loads(attributes["EndPoint"])["EndpointAddress"]
            except (KeyError, TypeError, ValueError):
                found[topic["TopicArn"]] = None
        token = page.get("NextToken") or ""
        if not token:
            return found


def _receiver(endpoint: str | None) -> tuple[str, str, str] | None:
    """The receiver an endpoint names, its token (query) aside."""
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    return parts.scheme, parts.netloc, parts.path.rstrip("/")
