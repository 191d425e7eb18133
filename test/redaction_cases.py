"""One table of redaction cases for every copy of the redaction module (operator and model runtime).

Plain data, no imports: ``test/unit/runtime/test_redaction.py`` runs it against
``kaito.runtime.redaction``, ``test/runtime/tuning/test_redaction.py`` against the runtime's copies.
"""

from __future__ import annotations

# (text as it would leave a process, what must come out)
CASES: list[tuple[str, str]] = [
    # URL userinfo: user:password and a bare token
    (
        "download failed: https://alice:hunter2@data.example/train.json: HTTP 500",
        "download failed: https://[redacted]@data.example/train.json: HTTP 500",
    ),
    ("git clone https://ghp_abc123@git.example/repo", "git clone https://[redacted]@git.example/repo"),
    ("oci://robot:pw@registry.example:5000/x:1", "oci://[redacted]@registry.example:5000/x:1"),
    # signature and token query parameters (Azure SAS, S3/GCS presigned, OAuth)
    (
        "GET https://acct.blob.example/c/d.jsonl?sv=2022-11-02&se=2030-01-01&sig=AbC%2Bdef%3D",
        "GET https://acct.blob.example/c/d.jsonl?sv=2022-11-02&se=[redacted]&sig=[redacted]",
    ),
    (
        "https://b.s3.example/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F20300101&X-Amz-Signature=f00d",
        "https://b.s3.example/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=[redacted]&X-Amz-Signature=[redacted]",
    ),
    ("https://h.example/cb?access_token=t0k&state=1", "https://h.example/cb?access_token=[redacted]&state=1"),
    ("https://h.example/p;token=abc", "https://h.example/p;token=[redacted]"),
    # Authorization credentials
    ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer [redacted]"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "Authorization: Basic [redacted]"),
    ("error=invalid token bearer Zm9vYmFyOTk=", "error=invalid token bearer [redacted]"),
    # token fields of a JSON body and a bare JSON Web Token
    ('{"token": "s3cr3t", "expires_in": 300}', '{"token": "[redacted]", "expires_in": 300}'),
    (
        '{"refresh_token":"r1","access_token":"a2"}',
        '{"refresh_token":"[redacted]","access_token":"[redacted]"}',
    ),
    ("got eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl back", "got [redacted] back"),
    # kept: what identifies a thing, challenges, prose
    ("secret hf-token in namespace ml not found", "secret hf-token in namespace ml not found"),
    (
        'Bearer realm="https://auth.example/token",service="registry"',
        'Bearer realm="https://auth.example/token",service="registry"',
    ),
    ("the registry wants basic authentication", "the registry wants basic authentication"),
    ("https://data.example/train.json?download=1", "https://data.example/train.json?download=1"),
    ("user@example.com wrote key=ns/name", "user@example.com wrote key=ns/name"),
    ("", ""),
]
