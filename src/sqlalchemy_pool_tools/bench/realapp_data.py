"""Data of the real-app benchmark: HS256 JWTs (standard library only), the ``User`` model and
its seeding. Kept apart from :mod:`.realapp_app`, which builds its engine at import."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Boolean, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SECRET = b"sqlalchemy-pool-bench-secret"
USERS = 1000


# --------------------------------------------------------------------------------------------
# Tokens: HS256 JWTs, standard library only
# --------------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(user_id: int, ttl_s: float = 86_400.0) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps({"sub": str(user_id), "exp": int(time.time() + ttl_s)}).encode())
    signature = hmac.new(SECRET, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(signature)}"


def verify_token(token: str) -> dict[str, Any]:
    """The claims of a valid token; ValueError otherwise (bad shape, signature, expiry)."""
    try:
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = json.loads(_unb64(header_b64))
    except (ValueError, TypeError) as error:
        raise ValueError("malformed token") from error
    if header.get("alg") != "HS256":
        raise ValueError("unsupported algorithm")
    expected = hmac.new(SECRET, f"{header_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _unb64(signature_b64)):
        raise ValueError("bad signature")
    claims = json.loads(_unb64(payload_b64))
    if float(claims.get("exp", 0)) < time.time():
        raise ValueError("expired")
    return claims


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "bench_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(200))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class UserOut(BaseModel):
    id: int
    name: str
    email: str
    active: bool


def seed(sync_url: Any) -> None:
    """(Re)create the users table with USERS rows (sync engine, called by the runner)."""
    import sqlalchemy as sa

    engine = sa.create_engine(sync_url)
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                sa.insert(User),
                [
                    {"id": i, "name": f"user {i}", "email": f"user{i}@example.com"}
                    for i in range(1, USERS + 1)
                ],
            )
    finally:
        engine.dispose()
