"""Background jobs of the workers nursery, one module per job.

Each module holds the job's pure logic (which reminder is due, whether an alert is owed), its SQL as
small transaction functions (`fn(conn, ...)`, run with `app.db.run`), and one `*_round` coroutine
that walks its rows in keyset batches with a LIMIT, one short transaction per batch. Messages are
queued in the outbox in the same transaction as the change that causes them; the outbox sender
delivers them after commit. `vpnd.nurseries.workers` runs every round under `run_periodic`.
"""
