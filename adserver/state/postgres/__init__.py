"""The PostgreSQL dialect of the state store."""
