"""A slow statement on every request (~250 ms), SQLAlchemy Core on an AsyncConnection; the
pool (5) is busy, not idle: the statement is the bottleneck, not the pool size."""

from common import ASYNC_URL, observe
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine(ASYNC_URL, pool_size=5, max_overflow=0, pool_timeout=20)
app = FastAPI()
REPORT = text("SELECT count(*) AS n, sum(price) AS total, pg_sleep(0.25) FROM items")


@app.get("/reports/daily")
async def daily_report() -> dict:
    async with engine.connect() as conn:
        row = (await conn.execute(REPORT)).one()
    return {"n": row.n, "total": row.total}


observe(app, engine, statement_timing="all")
