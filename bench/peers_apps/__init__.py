"""The peer arrangements that ``bench/peers.py`` times against ostinato, one module each.

Every arrangement runs the same pass, :func:`peers_apps.common.run_pass`, which
appends its start and end to a record file and runs the body the benchmark chose
(``$PEERS_BODY``). Each module reads its settings from the environment, so the
benchmark can start it with the tool's own command line (``rq worker``,
``celery worker``/``celery beat``, ``ostinato run``, ``python -m ...``).
"""
