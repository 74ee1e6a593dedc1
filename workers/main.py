"""Entry point for ``celery -A workers.main worker``: settings from the environment, read once here."""

import sys

from bucketlens.settings import Settings

from .app import create_celery

try:
    settings = Settings.from_env()
except ValueError as exc:  # a setting that does not parse or is out of bounds: one line and exit 2, as the CLI does
    print(f"bucketlens: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
app = create_celery(settings)
