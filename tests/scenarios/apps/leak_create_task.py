"""Session leaked via asyncio.create_task: the route opens a session by hand and hands it to a
fire-and-forget task that keeps using it (and its open transaction) after the response.
Fix (SCENARIO_FIXED=1): end the request's session in the request; the task opens its own."""

import asyncio

from common import ASYNC_URL, flag, observe
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine(ASYNC_URL, pool_size=5, max_overflow=5, pool_timeout=3)
Session = async_sessionmaker(engine, expire_on_commit=False)
app = FastAPI()
background: set[asyncio.Task] = set()

RECORD_VIEW = text("INSERT INTO audit (item_id, note) VALUES (:id, 'viewed')")


async def record_view(session, item_id: int) -> None:
    await asyncio.sleep(0.4)  # e.g. waits for the recommendation service first
    await session.execute(RECORD_VIEW, {"id": item_id})
    await session.commit()
    await session.close()


async def record_view_fresh(item_id: int) -> None:
    await asyncio.sleep(0.4)
    async with Session() as session, session.begin():
        await session.execute(RECORD_VIEW, {"id": item_id})


def spawn(coro) -> None:
    task = asyncio.create_task(coro)
    background.add(task)
    task.add_done_callback(background.discard)


@app.get("/items/{item_id}")
async def show_item(item_id: int) -> dict:
    session = Session()
    row = (
        await session.execute(text("SELECT name FROM items WHERE id = :id"), {"id": item_id})
    ).one()
    if flag("FIXED"):
        await session.close()
        spawn(record_view_fresh(item_id))
    else:
        spawn(record_view(session, item_id))  # BUG: the request's session outlives it
    return {"name": row.name}


observe(app, engine)
