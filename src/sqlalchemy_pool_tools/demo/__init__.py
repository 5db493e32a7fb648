"""The demo: a reference FastAPI + SQLAlchemy app (leaky and fixed builds), run under load
against an embedded PostgreSQL to show what pool exhaustion looks like and how to fix it."""

# The demo app's private holders route: `holders(engine)` as {"pools": {name: [...]}}, the
# shape `sqlalchemy-pool holders URL` reads.
HOLDERS_PATH = "/_debug/pool-holders"
# The demo server reads its database URL from here when --database-url is not given, so a
# password never shows on a command line.
DATABASE_URL_ENV = "SQLALCHEMY_POOL_DEMO_DATABASE_URL"
