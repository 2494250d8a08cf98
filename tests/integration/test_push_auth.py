"""OIDC push authentication, verified by google-auth against a local certificate endpoint
that plays Google's (the tokens are real RS256 JWTs signed with a key made here)."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from handlers.auth import AuthError, PushAuthenticator
from handlers.clients import storage_client
from handlers.http import create_app
from handlers.processor import Processor
from handlers.storage import Store

from .conftest import png_bytes
from .test_processor import FakeEngine

AUDIENCE = "https://imagen-upscale-abc-uc.a.run.app/"
FETCHES: list[str] = []  # the certificate endpoint's requests
PUSHER = "imagen-push@my-project.iam.gserviceaccount.com"


def _key_and_cert(common_name: str):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem_key, cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def certs():
    """A certificate endpoint on 127.0.0.1 in the format of Google's oauth2/v1/certs."""
    key, cert = _key_and_cert("good")
    body = json.dumps({"kid-1": cert}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            FETCHES.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "public, max-age=19774, must-revalidate, no-transform")  # Google's
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield key, f"http://127.0.0.1:{server.server_port}/certs"
    server.shutdown()


def _token(key: bytes, kid="kid-1", **claims) -> str:
    now = int(time.time())
    payload = {"iss": "https://accounts.google.com", "aud": AUDIENCE, "iat": now, "exp": now + 600,
               "email": PUSHER, "email_verified": True, "sub": "1234"}
    payload.update(claims)
    return jwt.encode(crypt.RSASigner.from_string(key, key_id=kid), payload).decode()


@pytest.fixture
def client(settings, certs, bucket):
    engine = FakeEngine()
    processor = Processor(engine=engine, store=Store(storage_client(settings)), settings=settings)
    app = create_app(processor, lambda: "READY", PushAuthenticator(AUDIENCE, frozenset({PUSHER}), certs[1]))
    blob = bucket.blob("incoming/upscale/a.png")
    blob.upload_from_string(png_bytes(), content_type="image/png")
    blob.reload()
    resource = {"bucket": bucket.name, "name": blob.name, "generation": str(blob.generation)}
    envelope = {"message": {"data": base64.b64encode(json.dumps(resource).encode()).decode(),
                            "attributes": {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"},
                            "messageId": "1"}, "subscription": "projects/p/subscriptions/s"}
    return app.test_client(), json.dumps(envelope), engine


def _push(client, body, token=None):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.post("/", data=body, headers=headers)


def test_valid_token_from_the_push_account_is_processed(client, certs):
    http_client, body, engine = client
    response = _push(http_client, body, _token(certs[0]))
    assert response.status_code == 200 and response.json["status"] == "succeeded"
    assert engine.calls == 1


@pytest.mark.parametrize(
    "make_token, status",
    [
        (lambda key: None, 401),  # no Authorization header
        (lambda key: "not-a-jwt", 401),
        (lambda key: _token(key, aud="https://someone-else.example/"), 401),
        (lambda key: _token(key, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), 401),
        (lambda key: _token(_key_and_cert("forger")[0]), 401),  # signed by a key Google never had
        (lambda key: _token(key, kid="unknown-kid"), 401),
        (lambda key: _token(key, iss="https://issuer.example"), 401),
        (lambda key: _token(key, iss=None), 401),
        (lambda key: _token(key, email="intruder@evil.example"), 403),  # any Google account can get a token
        (lambda key: _token(key, email_verified=False), 403),
    ],
)
def test_missing_or_wrong_tokens_get_no_work(client, certs, make_token, status):
    http_client, body, engine = client
    response = _push(http_client, body, make_token(certs[0]))
    assert response.status_code == status and response.json["error"]
    assert engine.calls == 0


def test_a_rejected_token_is_never_quoted(client, certs, caplog):
    """google-auth quotes a malformed token whole: an OAuth access token sent by mistake
    (a credential) went into the log line and the 401 body."""
    http_client, body, engine = client
    secret = "ya29.a0AfB_SECRETACCESSTOKENxyz123"
    with caplog.at_level("WARNING", logger="imagen"):
        response = _push(http_client, body, secret)
    assert response.status_code == 401 and response.json["error"].startswith("invalid token: ")
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "push refused: invalid token" in logged
    for text in (response.json["error"], logged):
        assert "SECRET" not in text and "ya29" not in text and "<token>" in text
    assert engine.calls == 0


def test_health_endpoints_stay_open(client):
    http_client, _, _ = client
    assert http_client.get("/healthz").status_code == 200
    assert http_client.get("/readyz").status_code == 200


def test_signing_certificates_are_fetched_once_while_fresh(settings, certs):
    """google-auth would fetch them at every push: kept per their Cache-Control instead."""
    authenticator = PushAuthenticator(AUDIENCE, frozenset({PUSHER}), certs[1])
    before = len(FETCHES)
    for _ in range(3):
        assert authenticator.check(f"Bearer {_token(certs[0])}")["email"] == PUSHER
    assert len(FETCHES) - before == 1


@pytest.mark.parametrize("configured", [AUDIENCE, AUDIENCE.rstrip("/")])
@pytest.mark.parametrize("signed_for", [AUDIENCE, AUDIENCE.rstrip("/")])
def test_the_audience_is_the_service_url_with_or_without_its_slash(certs, configured, signed_for):
    # Terraform's push tokens carry the service URL; the endpoint is that URL with "/": a user
    # who sets either must not get 401 on every push (and, 20 deliveries on, dead letters).
    authenticator = PushAuthenticator(configured, frozenset({PUSHER}), certs[1])
    assert authenticator.check(f"Bearer {_token(certs[0], aud=signed_for)}")["email"] == PUSHER
    with pytest.raises(AuthError):
        authenticator.check(f"Bearer {_token(certs[0], aud=signed_for + 'x')}")


def test_unreachable_certificates_answer_503_not_401(certs):
    """Not the token's fault: the push is retried rather than logged as an invalid token."""
    authenticator = PushAuthenticator(AUDIENCE, frozenset({PUSHER}), "http://127.0.0.1:9/certs")  # nothing listens
    with pytest.raises(AuthError) as refused:
        authenticator.check(f"Bearer {_token(certs[0])}")
    assert refused.value.status == 503 and "signing certificates" in str(refused.value)
