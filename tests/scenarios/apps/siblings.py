"""One of several worker processes: its siblings (held by the test) already use most of the
server's max_connections, so this worker's connects fail with "too many clients already"."""

from common import ASYNC_URL, observe
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

engine = create_async_engine(ASYNC_URL, pool_size=5, max_overflow=5, pool_timeout=3)
app = FastAPI()


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict:
    async with engine.begin() as conn:
        name = await conn.scalar(
            text("SELECT name FROM items, pg_sleep(0.02) WHERE id = :id"), {"id": item_id}
        )
    return {"name": name}


observe(app, engine)
