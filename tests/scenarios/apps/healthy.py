"""A healthy service: ORM-style session per request via a dependency, short queries, a pool
with room to spare."""

from typing import Annotated

from common import ASYNC_URL, observe
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

engine = create_async_engine(ASYNC_URL, pool_size=10, max_overflow=5, pool_timeout=5)
Session = async_sessionmaker(engine, expire_on_commit=False)


async def get_session():
    async with Session() as session:
        yield session


app = FastAPI()


@app.get("/items/{item_id}")
async def read_item(item_id: int, session: Annotated[AsyncSession, Depends(get_session)]):
    row = (
        await session.execute(text("SELECT id, price FROM items WHERE id = :id"), {"id": item_id})
    ).one()
    await session.commit()
    return {"id": row.id, "price": row.price}


observe(app, engine)
