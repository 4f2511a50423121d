"""``pipeline backfill calls --from T --to T`` (see pipeline.ingest.pollers)."""

from pipeline.ingest.pollers import register_backfill as register

__all__ = ["register"]
