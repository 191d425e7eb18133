"""A static bearer-token credential for talking to the fake ARM (no Azure AD is reachable in tests)."""

from __future__ import annotations

import time
from typing import Any

from azure.core.credentials import AccessToken


class StaticTokenCredential:
    """An async azure-core token credential that always returns the same token (valid for an hour)."""

    def __init__(self, token: str = "fake-arm-token") -> None:
        self._token = token

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        """Return the static token for any scope."""
        return AccessToken(self._token, int(time.time()) + 3600)

    async def close(self) -> None:
        """Nothing to release."""

    async def __aenter__(self) -> StaticTokenCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
