"""From production traffic to clean datasets: logged requests (or fine-tuning rows) read, filtered, scrubbed,
de-duplicated and split into train/test files the search reads (python -m flows.ingest; docs/ingest.md)."""
