"""Undersized pool: honest, short queries (30 ms), a request-scoped session from a dependency,
and a pool of 2 for 12 concurrent clients. Fix: a bigger pool (SCENARIO_POOL_SIZE)."""

from typing import Annotated

from common import ASYNC_URL, knob, observe
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

engine = create_async_engine(
    ASYNC_URL, pool_size=int(knob("POOL_SIZE", 2)), max_overflow=0, pool_timeout=5
)
Session = async_sessionmaker(engine, expire_on_commit=False)


async def get_session():
    async with Session() as session:
        yield session


DB = Annotated[AsyncSession, Depends(get_session)]
app = FastAPI()


@app.get("/items/{item_id}")
async def read_item(item_id: int, session: DB) -> dict:
    async with session.begin():
        row = (
            await session.execute(
                text("SELECT id, name, pg_sleep(0.03) FROM items WHERE id = :id"),
                {"id": item_id},
            )
        ).one()
    return {"id": row.id, "name": row.name}


observe(app, engine)
