"""Shared contracts of bucketlens: settings, Redis key names, message schemas, the CLI.

Nothing in this package imports torch or faiss.
"""
