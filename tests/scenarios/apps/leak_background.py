"""Session leaked via BackgroundTasks, in a repository-class style: the repository (and its
session) built by a dependency is used again by a background task after the response."""

import asyncio

from common import ASYNC_URL, observe
from fastapi import BackgroundTasks, Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

engine = create_async_engine(ASYNC_URL, pool_size=5, max_overflow=5, pool_timeout=3)
Session = async_sessionmaker(engine, expire_on_commit=False)


class OrderRepository:
    def __init__(self) -> None:
        self.session: AsyncSession = Session()

    async def get(self, order_id: int):
        return (
            await self.session.execute(
                text("SELECT id, price FROM items WHERE id = :id"), {"id": order_id}
            )
        ).one()

    async def mark_notified(self, order_id: int) -> None:
        await asyncio.sleep(0.3)  # the e-mail provider's API
        await self.session.execute(
            text("INSERT INTO audit (item_id, note) VALUES (:id, 'notified')"), {"id": order_id}
        )
        await self.session.commit()
        await self.session.close()


app = FastAPI()


@app.get("/orders/{order_id}")
async def get_order(
    order_id: int, tasks: BackgroundTasks, repo: OrderRepository = Depends(OrderRepository)
) -> dict:
    order = await repo.get(order_id)
    tasks.add_task(repo.mark_notified, order_id)  # BUG: runs after the response, same session
    return {"id": order.id, "price": order.price}


observe(app, engine)
