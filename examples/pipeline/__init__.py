"""The article's ingestion service, end to end: POSTed queue-time metrics drained by continuous code.

``serve`` is the ingest tier, ``loops`` the continuous code (``ostinato run
examples.pipeline.loops:app``), ``load`` the load generator and ``demo`` what
``make demo`` runs. See docs/pipeline.md.
"""
