"""Prefect flows. Importing this package sets quiet, offline-friendly defaults before Prefect and HF load."""

import tasks.core.env  # noqa: F401  (before any Prefect or HF import)
