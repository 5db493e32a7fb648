"""Connection churn: something between app and server (a firewall, PgBouncer's idle timeout)
kills idle connections; pre-ping finds them dead and reconnects. The test plays the firewall."""

from common import ASYNC_URL, observe
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

engine = create_async_engine(
    ASYNC_URL, pool_size=5, max_overflow=0, pool_timeout=5, pool_pre_ping=True
)
Session = async_sessionmaker(engine)
app = FastAPI()


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict:
    async with Session.begin() as session:
        name = await session.scalar(text("SELECT name FROM items WHERE id = :id"), {"id": item_id})
    return {"name": name}


observe(app, engine, set_application_name=True)
