"""A transaction held open across an awaited HTTP call to a slow service; the session itself
is closed correctly inside the request. Fix (SCENARIO_FIXED=1): commit before the await."""

import asyncio

import httpx
from common import ASYNC_URL, flag, observe
from fastapi import FastAPI, Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine(ASYNC_URL, pool_size=5, max_overflow=0, pool_timeout=5)
Session = async_sessionmaker(engine, expire_on_commit=False)
client = httpx.AsyncClient(timeout=10)
app = FastAPI()


@app.get("/upstream")
async def pricing_service() -> dict:
    await asyncio.sleep(0.25)  # a slow dependency
    return {"discount": 5}


@app.get("/checkout/{item_id}")
async def checkout(item_id: int, request: Request) -> dict:
    async with Session() as session:
        item = (
            await session.execute(text("SELECT price FROM items WHERE id = :id"), {"id": item_id})
        ).one()
        if flag("FIXED"):
            await session.commit()  # end the transaction: the connection goes back
        discount = (await client.get(f"{request.base_url}upstream")).json()["discount"]
        await session.execute(
            text("INSERT INTO audit (item_id, note) VALUES (:id, :note)"),
            {"id": item_id, "note": f"paid {item.price - discount}"},
        )
        await session.commit()
    return {"price": item.price - discount}


observe(app, engine)
