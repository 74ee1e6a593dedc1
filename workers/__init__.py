"""Celery workers: fetch objects from S3, decode, embed, write vectors to the result stream.

Run with ``bucketlens worker`` or ``celery -A workers.main worker``.
"""
