"""S3 events in, Celery tasks and delete entries out."""
