"""Session never closed, in a synchronous route (psycopg, thread pool): the connection goes
back to the pool only when the garbage collector reclaims the session."""

from common import SYNC_URL, observe
from fastapi import FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

engine = create_engine(SYNC_URL, pool_size=5, max_overflow=5, pool_timeout=3)
SessionLocal = sessionmaker(engine)
app = FastAPI()


@app.get("/users/{user_id}")
def get_user(user_id: int) -> dict:
    db = SessionLocal()  # BUG: never closed
    row = db.execute(text("SELECT id, name FROM items WHERE id = :id"), {"id": user_id}).one()
    return {"id": row.id, "name": row.name}


observe(app, engine)
