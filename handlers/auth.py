"""Push authentication: verify the OIDC token Pub/Sub push (or Eventarc) attaches to a request.

Enabled when IMAGEN_PUSH_AUDIENCE is set: the token must be a Google-signed ID token issued by
Google for that audience, from one of IMAGEN_PUSH_SERVICE_ACCOUNTS (required with it: any
Google account can mint a token for any audience), with a verified email. On Cloud
Run the platform's own invoker check runs first; this check makes `imagen serve` safe to expose
anywhere else too (GKE, a VM) and guards against a misconfigured ingress.
"""

from __future__ import annotations

import google.auth.exceptions
import google.auth.transport.requests
import requests
from cachecontrol import CacheControl
from google.oauth2 import id_token

from image.errors import ImagenError

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = frozenset({"https://accounts.google.com", "accounts.google.com"})


class AuthError(ImagenError):
    """`status` is the HTTP answer: 401 (no or bad token), 403 (a valid token, wrong sender)
    or 503 (the signing certificates could not be fetched: try again)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class PushAuthenticator:
    def __init__(self, audience: str, allowed_emails: frozenset[str], certs_url: str = GOOGLE_CERTS_URL):
        # The audience Terraform gives push tokens is the service URL, and the endpoint that
        # URL with "/": either form set here is the same service's.
        self._audience = sorted({audience.rstrip("/"), audience.rstrip("/") + "/"})
        self._allowed = allowed_emails
        self._certs_url = certs_url
        # google-auth fetches the signing certificates at every check; a caching session keeps
        # them as long as Google's Cache-Control says (hours), as google-auth's docs advise.
        self._request = google.auth.transport.requests.Request(session=CacheControl(requests.Session()))

    def check(self, authorization: str | None) -> dict:
        """Verify an `Authorization` header value; return the token's claims or raise AuthError."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "missing bearer token")
        try:
            claims = id_token.verify_token(
                token.strip(), self._request, audience=self._audience, certs_url=self._certs_url,
                clock_skew_in_seconds=10,
            )
        except google.auth.exceptions.TransportError as error:
            # Not the token's fault: the sender retries on 503 (Pub/Sub and Eventarc do).
            raise AuthError(503, f"could not fetch the token's signing certificates: {error}") from None
        except (ValueError, google.auth.exceptions.GoogleAuthError) as error:
            # google-auth quotes a malformed token whole (an access token sent by mistake is a
            # credential): never into a log line or the answer.
            raise AuthError(401, f"invalid token: {_without(str(error), token.strip())}") from None
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise AuthError(401, f"invalid token: issued by {str(claims.get('iss'))[:100]!r}, not Google")
        email = claims.get("email")
        if not claims.get("email_verified") or not email:
            raise AuthError(403, "token has no verified email")
        if email not in self._allowed:
            raise AuthError(403, f"{email} may not push to this service")
        return claims


def _without(text: str, token: str) -> str:
    """`text` with the token, and any of its dot-separated parts long enough to be secret,
    replaced by `<token>`."""
    for part in sorted({token, *token.split(".")}, key=len, reverse=True):
        if len(part) >= 8:
            text = text.replace(part, "<token>")
    return text

