"""Entry point for ``celery -A workers.main worker``: settings from the environment, read once here."""

from bucketlens.settings import Settings

from .app import create_celery

app = create_celery(Settings.from_env())
