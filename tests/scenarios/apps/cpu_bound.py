"""A CPU-saturated worker: every request verifies its token with pure-Python work (~25 ms of
CPU), then runs a short query. One event loop, one core: the pool is not the bottleneck."""

import hashlib

from common import ASYNC_URL, knob, observe
from fastapi import Depends, FastAPI, Header
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine(
    ASYNC_URL, pool_size=int(knob("POOL_SIZE", 5)), max_overflow=int(knob("MAX_OVERFLOW", 10))
)
Session = async_sessionmaker(engine, expire_on_commit=False)
app = FastAPI()


async def verify_token(authorization: str = Header(default="Bearer demo")) -> str:
    """A hand-rolled signature check, as found in real services (pure Python, CPU-bound, on
    the event loop: an async dependency)."""
    digest = hashlib.sha256(authorization.encode()).digest()
    acc = 0
    for _ in range(int(knob("TOKEN_ROUNDS", 3000))):
        for byte in digest:
            acc = (acc * 31 + byte) % 1_000_003
    return str(acc)


@app.get("/me/items/{item_id}")
async def my_item(item_id: int, user: str = Depends(verify_token)) -> dict:
    async with Session() as session:
        name = await session.scalar(text("SELECT name FROM items WHERE id = :id"), {"id": item_id})
    return {"user": user, "name": name}


observe(app, engine)
