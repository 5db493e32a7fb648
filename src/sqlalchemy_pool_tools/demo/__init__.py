"""The demo: a reference FastAPI + SQLAlchemy app (leaky and fixed builds), run under load
against an embedded PostgreSQL to show what pool exhaustion looks like and how to fix it."""
