"""Prefect flows. Importing this package sets quiet, offline-friendly defaults before Prefect and HF load."""

import tasks.env  # noqa: F401  (before any Prefect or HF import)
