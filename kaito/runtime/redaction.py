"""Redacting secrets from text by what they look like, wherever text leaves a process.

Logs, Events, status conditions and termination messages carry text that came from elsewhere: a URL a
user gave, an error a library raised, a container's last words. Key names cannot tell what such text
holds, so :func:`redact` looks at values: URL userinfo (``https://user:pass@host``), ``Bearer`` and
``Basic`` credentials, signature and token query parameters (``sig``, ``X-Amz-Signature``,
``access_token``, ...), token fields of JSON bodies and JSON Web Tokens. What identifies a thing (a
host, a path, a Secret's name) is kept, so the text stays useful.

Standard library only: this file is copied byte for byte into the model runtime
(``presets/tuning/kaito_tuning/redaction.py`` and ``presets/oci/redaction.py``), which does not ship
the operator package; ``test/unit/runtime/test_redaction.py`` keeps the copies identical and one table
of cases (``test/redaction_cases.py``) tests all three.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"

# Query (or form) parameters whose value is a credential: SAS signatures (sig; se/st/sp/skoid... are
# harmless alone but travel with it), presigned S3/GCS URLs, OAuth tokens, passwords.
SECRET_PARAMETERS = (
    "sig",
    "se",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "client_secret",
    "password",
    "passwd",
    "api_key",
    "apikey",
)

# scheme://userinfo@ -- any userinfo: "user:password@" and a bare "token@" are both credentials.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]+@")
# Authorization schemes followed by their credential (token68 syntax, RFC 7235). Not a challenge's
# parameters (``Bearer realm="..."``) and not prose ("basic authentication"): see _credential_like.
_AUTH_SCHEME = re.compile(
    r"(?P<scheme>\b(?:Bearer|Basic)\s+)(?P<token>[A-Za-z0-9._~+/-]+=*)(?![A-Za-z0-9._~+/=-])", re.IGNORECASE
)
# name=value after ?, & or ; (a query string or form body).
_PARAMETER = re.compile(
    r"(?P<name>[?&;](?:" + "|".join(re.escape(p) for p in SECRET_PARAMETERS) + r")=)[^&#\s\"'<>]+",
    re.IGNORECASE,
)
# "token": "...", as token endpoints answer and as errors sometimes echo.
_JSON_FIELD = re.compile(
    r"(?P<name>\"(?:token|access_token|refresh_token|id_token|password|client_secret)\"\s*:\s*\")[^\"]*",
    re.IGNORECASE,
)
# Every pattern below needs one of these substrings (userinfo "@", parameters "=", JSON fields '"',
# JWTs "eyJ", auth schemes "earer"/"asic" in any capitalisation).
_MARKERS = ("@", "=", '"', "eyJ", "earer", "EARER", "asic", "ASIC")
# A JSON Web Token anywhere (header.payload.signature, base64url, the header starts with {").
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """``text`` with every credential-looking value replaced by ``[redacted]`` (the rest unchanged).

    >>> redact("GET https://bob:hunter2@data.example/x.json?sv=1&sig=abc failed: Bearer eyJ0")
    'GET https://[redacted]@data.example/x.json?sv=1&sig=[redacted] failed: Bearer [redacted]'
    """
    if not any(marker in text for marker in _MARKERS):
        return text  # the common case (every log value passes here): nothing that could match
    text = _USERINFO.sub(lambda m: m.group("scheme") + REDACTED + "@", text)
    text = _AUTH_SCHEME.sub(_auth_credential, text)
    text = _PARAMETER.sub(lambda m: m.group("name") + REDACTED, text)
    text = _JSON_FIELD.sub(lambda m: m.group("name") + REDACTED, text)
    return _JWT.sub(REDACTED, text)


def _auth_credential(m: re.Match[str]) -> str:
    token = m.group("token")
    if re.fullmatch(r"[a-z_]+=", token):
        return m.group(0)  # a challenge's parameter: Bearer realm="...",service="..."
    # A header spells the scheme capitalised; prose says "bearer token" or "basic auth". A real
    # credential has a digit, a capital after the first letter or token68 punctuation.
    header = m.group("scheme")[0].isupper()
    credential_like = any(c.isdigit() or c in "._~+/-=" for c in token) or any(c.isupper() for c in token[1:])
    if header or credential_like:
        return m.group("scheme") + REDACTED
    return m.group(0)
