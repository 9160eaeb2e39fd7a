"""The SQLite dialect of the state store."""
