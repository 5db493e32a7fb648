"""An async route calls a synchronous SDK (a blocking ~35 ms call) while its session holds a
connection: the event loop stops for every call. Fix (SCENARIO_FIXED=1): asyncio.to_thread."""

import asyncio
import time

from common import ASYNC_URL, flag, observe
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine(ASYNC_URL, pool_size=5, max_overflow=5, pool_timeout=5)
Session = async_sessionmaker(engine, expire_on_commit=False)
app = FastAPI()


def fetch_exchange_rate(currency: str) -> float:
    """A vendor SDK without an async client (requests inside)."""
    time.sleep(0.035)
    return 1.08


@app.get("/quotes/{item_id}")
async def quote(item_id: int) -> dict:
    async with Session() as session, session.begin():
        price = await session.scalar(
            text("SELECT price FROM items WHERE id = :id"), {"id": item_id}
        )
        if flag("FIXED"):
            rate = await asyncio.to_thread(fetch_exchange_rate, "EUR")
        else:
            rate = fetch_exchange_rate("EUR")  # BUG: blocks the event loop
    return {"price": price * rate}


observe(app, engine)
