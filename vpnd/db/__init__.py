"""PostgreSQL access: the pool bridge (`Database.run`), schema migrations, and one module per domain."""

from vpnd.db.pool import CONNECTION_ERRORS, Database, DatabaseUnavailable, open_database

__all__ = ["CONNECTION_ERRORS", "Database", "DatabaseUnavailable", "open_database"]
