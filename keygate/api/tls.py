"""mTLS: an h11 protocol that hands the client certificate to the app.

uvicorn does not put the peer certificate into the ASGI scope.  This protocol (selected with
uvicorn's ``http=`` option) wraps the app per connection and adds the certificate's DER bytes as
``scope["extensions"]["tls"]["client_cert_der"]``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ClientCertH11Protocol"]


class ClientCertH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        app = self.app

        async def with_cert(scope: Any, receive: Any, send: Any) -> None:
            if scope.get("type") == "http":
                scope.setdefault("extensions", {})["tls"] = {"client_cert_der": der}
            await app(scope, receive, send)

        self.app = with_cert
