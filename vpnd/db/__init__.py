"""PostgreSQL access: the pool bridge (`Database.run`), schema migrations, and one module per domain."""

from vpnd.db.pool import Database, DatabaseUnavailable, open_database

__all__ = ["Database", "DatabaseUnavailable", "open_database"]
