"""Request and response bodies (Pydantic at the edge only).  Unknown fields are rejected."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DecryptBatchRequest",
    "DecryptRequest",
    "EncryptBatchRequest",
    "EncryptRequest",
    "Problem",
    "RecordBatchRequest",
    "RecordRequest",
    "RewrapBatchRequest",
]

_STRICT = ConfigDict(extra="forbid", strict=True)


class EncryptRequest(BaseModel):
    model_config = _STRICT
    tenant: str = Field(examples=["131016"])
    purpose: str = Field(examples=["resident"])
    context: dict[str, str] = Field(
        default_factory=dict, examples=[{"record_id": "R-000123", "field": "name"}]
    )
    plaintext: str = Field(
        description="standard base64 (RFC 4648 §4)", examples=["5bGx55Sw5aSq6YOO"]
    )


class EncryptResponse(BaseModel):
    ciphertext: str
    key_version: int


class DecryptRequest(BaseModel):
    model_config = _STRICT
    tenant: str
    purpose: str
    context: dict[str, str] = Field(default_factory=dict)
    ciphertext: str


class DecryptResponse(BaseModel):
    plaintext: str


class EncryptItem(BaseModel):
    model_config = _STRICT
    context: dict[str, str] = Field(default_factory=dict)
    plaintext: str


class DecryptItem(BaseModel):
    model_config = _STRICT
    context: dict[str, str] = Field(default_factory=dict)
    ciphertext: str


class RewrapItem(BaseModel):
    model_config = _STRICT
    ciphertext: str


class EncryptBatchRequest(BaseModel):
    model_config = _STRICT
    tenant: str
    purpose: str
    items: list[EncryptItem]


class DecryptBatchRequest(BaseModel):
    model_config = _STRICT
    tenant: str
    purpose: str
    items: list[DecryptItem]


class RewrapBatchRequest(BaseModel):
    model_config = _STRICT
    tenant: str
    purpose: str
    items: list[RewrapItem]


class RecordRequest(BaseModel):
    model_config = _STRICT
    tenant: str
    record_id: str
    record: dict[str, Any]


class RecordItem(BaseModel):
    model_config = _STRICT
    record_id: str
    record: dict[str, Any]


class RecordBatchRequest(BaseModel):
    model_config = _STRICT
    tenant: str
    items: list[RecordItem]


class Problem(BaseModel):
    """application/problem+json (RFC 9457) with keygate's stable ``code``."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    request_id: str
