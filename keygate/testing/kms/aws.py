"""A local AWS KMS for tests and the bench: moto in server mode, IAM enforced, behind a small front.

What is **real moto** (5.x, ``moto.server.ThreadedMotoServer`` run in a child process, so its
process-global state and its botocore hook stay out of the caller's process):

- the KMS JSON 1.1 wire protocol (``POST /``, ``X-Amz-Target: TrentService.*``), key creation,
  aliases, ``Encrypt`` / ``Decrypt`` with the encryption context bound as AAD (moto's own
  ciphertext format), ``DescribeKey``, ``DisableKey`` / ``EnableKey`` / ``ScheduleKeyDeletion``
  (which set the key state that ``DescribeKey`` reports), ``NotFoundException`` for unknown keys,
  ``InvalidCiphertextException`` for tampered, truncated or random blobs and a wrong context;
- credentials: moto's IAM authentication is switched on (``POST /moto-api/reset-auth`` with 0,
  the server-mode form of ``INITIAL_NO_AUTH_ACTION_COUNT``) after two IAM users are made *inside*
  moto: ``admin`` (``kms:*``, used only by this class) and ``app`` (``kms:Encrypt``,
  ``kms:Decrypt``, ``kms:DescribeKey``; what :meth:`MotoKmsServer.settings` hands out).  moto
  then verifies every request's SigV4 signature with the user's secret key and evaluates the
  user's IAM policy.  (moto authorizes KMS actions against resource ``*``, so the app policy
  cannot be narrowed to key ARNs here as it should be in production.)

What is the **shim** (:class:`keygate.testing.kms._front.HttpFront` plus :meth:`_respond`,
between the SDK and moto, on the wire only; neither boto3 nor keygate is patched):

- key state, which moto does not enforce: after moto answered ``Encrypt``, ``Decrypt``,
  ``ReEncrypt`` or ``GenerateDataKey*`` (successfully, or with a ciphertext error), the front asks
  moto's ``DescribeKey`` (as ``admin``) for the key named in the request or in moto's answer and,
  if the key is ``Disabled`` or ``PendingDeletion``, replaces the answer with real KMS's
  ``DisabledException`` ("ARN is disabled.") or ``KMSInvalidStateException`` ("ARN is pending
  deletion."), HTTP 400, JSON 1.1 error shape;
- moto answers authentication failures in the XML shape of query-protocol services (HTTP 403);
  the front rewrites them into KMS's JSON errors: ``InvalidClientTokenId`` →
  ``UnrecognizedClientException``, ``SignatureDoesNotMatch`` → ``InvalidSignatureException``,
  ``AccessDenied`` → ``AccessDeniedException`` (HTTP 400, moto's message kept);
- moto answers ``Decrypt`` with a ``KeyId`` that did not make the ciphertext with
  ``AccessDeniedException``; real KMS says ``IncorrectKeyException``, and so does the front;
- ``received``, ``calls`` and ``fault()`` (down / slow / error = HTTP 500 ``KMSInternalException``).

Differences from real KMS that remain: moto's ciphertext format and sizes; no key policies or
grants; no ``kms:EncryptionContext`` conditions; TLS is not used (plain HTTP on 127.0.0.1);
``ExpiredTokenException`` cannot be produced (moto issues no session tokens here).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import subprocess
import sys
import threading
import uuid
from collections import Counter
from types import TracebackType
from typing import Any, Final

import boto3
import botocore.exceptions
from botocore.config import Config
from pydantic import SecretStr

from keygate.providers.aws import AwsKmsSettings
from keygate.testing.kms._front import FrontReply, FrontRequest, HttpFront

__all__ = ["MotoKmsServer"]

_CHILD: Final = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes our stdin (or signals us)
server.stop()
"""
_JSON: Final = "application/x-amz-json-1.1"
_STATEFUL: Final = frozenset(
    {
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
    }
)
#: moto's answer types after which the key state is still checked (real KMS checks it first)
_STATE_BEFORE: Final = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_AUTH_REWRITE: Final = {
    "InvalidClientTokenId": (
        "UnrecognizedClientException",
        "The security token included in the request is invalid.",
    ),
    "SignatureDoesNotMatch": ("InvalidSignatureException", None),
    "AccessDenied": ("AccessDeniedException", None),
}
_XML_FIELD: Final = re.compile(r"<(Code|Message)>([^<]*)</\1>")
_CREDENTIAL_REGION: Final = re.compile(r"Credential=[^/,]+/[0-9]+/([a-z0-9-]+)/kms/")
_CAMEL: Final = re.compile(r"(?<!^)(?=[A-Z])")


def _error(type_: str, message: str, status: int = 400) -> FrontReply:
    body = json.dumps({"__type": type_, "message": message}).encode()
    return FrontReply(
        status, [("Content-Type", _JSON), ("x-amzn-RequestId", str(uuid.uuid4()))], body
    )


def _operation(request: FrontRequest) -> str:
    action = request.headers.get("x-amz-target", "").rpartition(".")[2]
    return _CAMEL.sub("_", action).lower() if action else f"{request.method} {request.path}"


class MotoKmsServer:
    """moto's KMS with IAM auth and a key-state front, on 127.0.0.1; a context manager."""

    scheme: Final = "aws-kms"
    account: Final = "123456789012"
    default_region: Final = "ap-northeast-1"

    def __init__(self, *, slow_s: float = 2.0, startup_timeout: float = 30.0) -> None:
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._moto_port = 0
        self._moto_url = ""
        self._admin_creds: dict[str, str] = {}
        self._app_key_id = ""
        self._app_secret = ""
        self._admins: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._front: HttpFront | None = None
        self._slow_s = slow_s

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> MotoKmsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter, fixed script
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        try:
            self._moto_port = self._read_port(self._proc)
            self._moto_url = f"http://127.0.0.1:{self._moto_port}"
            self._provision()
            self._front = HttpFront(
                self._moto_url,
                operation=_operation,
                error_reply=_error(
                    "KMSInternalException",
                    "We encountered an internal error. Please try again.",
                    500,
                ),
                respond=self._respond,
                slow_s=self._slow_s,
            )
            self._front.start()
        except BaseException:
            self.stop()
            raise

    def _read_port(self, proc: subprocess.Popen[bytes]) -> int:
        """The port the child's moto server printed once it listened."""
        line = b""
        if proc.stdout is not None:
            ready, _, _ = select.select([proc.stdout], [], [], self._startup_timeout)
            line = proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            raise RuntimeError("moto server did not start")
        return int(line)

    def stop(self) -> None:
        if self._front is not None:
            self._front.stop()
            self._front = None
        for client in self._admins.values():
            client.close()
        self._admins.clear()
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()

    def _provision(self) -> None:
        """Make the admin and app IAM users inside moto, then switch IAM enforcement on."""
        iam = boto3.client(
            "iam",
            region_name="us-east-1",
            endpoint_url=self._moto_url,
            aws_access_key_id="provisioning",
            aws_secret_access_key="provisioning",  # noqa: S106 - ignored: auth is still off
            config=Config(retries={"total_max_attempts": 1}),
        )
        keys = {}
        for user, actions in (
            ("keygate-admin", ["kms:*"]),
            ("keygate-app", ["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"]),
        ):
            iam.create_user(UserName=user)
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
            }
            iam.put_user_policy(
                UserName=user, PolicyName="keygate", PolicyDocument=json.dumps(policy)
            )
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        iam.close()
        admin, app = keys["keygate-admin"], keys["keygate-app"]
        self._admin_creds = {
            "aws_access_key_id": admin["AccessKeyId"],
            "aws_secret_access_key": admin["SecretAccessKey"],
        }
        self._app_key_id, self._app_secret = app["AccessKeyId"], app["SecretAccessKey"]
        conn = http.client.HTTPConnection("127.0.0.1", self._moto_port, timeout=10)
        try:
            conn.request("POST", "/moto-api/reset-auth", body=b"0")
            status = conn.getresponse().status
        finally:
            conn.close()
        if status != 200:
            raise RuntimeError("moto refused to switch IAM authentication on")

    # ------------------------------------------------------------------ the common shape
    @property
    def front(self) -> HttpFront:
        if self._front is None:
            raise RuntimeError("MotoKmsServer is not started")
        return self._front

    @property
    def url(self) -> str:
        """The endpoint the adapter talks to (the front)."""
        return self.front.url

    @property
    def received(self) -> list[bytes]:
        return self.front.received

    @property
    def calls(self) -> Counter[str]:
        return self.front.calls

    @property
    def slow_s(self) -> float:
        return self.front.slow_s

    @slow_s.setter
    def slow_s(self, value: float) -> None:
        self.front.slow_s = value

    def fault(self, mode: str | None) -> None:
        self.front.fault(mode)

    def admin(self, region: str | None = None) -> Any:
        """A boto3 KMS client as the admin user, straight to moto (not seen by the front)."""
        region = region or self.default_region
        with self._lock:
            client = self._admins.get(region)
            if client is None:
                client = boto3.client(
                    "kms",
                    region_name=region,
                    endpoint_url=self._moto_url,
                    config=Config(retries={"total_max_attempts": 1}),
                    **self._admin_creds,
                )
                self._admins[region] = client
            return client

    def create_key(self, name: str, *, region: str | None = None) -> str:
        """A symmetric ENCRYPT_DECRYPT key with alias ``alias/NAME``; returns its key-ARN URI."""
        admin = self.admin(region)
        meta = admin.create_key(
            Description=name, KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT"
        )["KeyMetadata"]
        admin.create_alias(AliasName=f"alias/{name}", TargetKeyId=meta["KeyId"])
        return f"aws-kms://{meta['Arn']}"

    def _key(self, uri: str) -> tuple[Any, str]:
        arn = uri.partition("://")[2]
        admin = self.admin(arn.split(":")[3])
        key_id = admin.describe_key(KeyId=arn)["KeyMetadata"]["KeyId"]
        return admin, key_id

    def set_key_enabled(self, uri: str, enabled: bool) -> None:
        admin, key_id = self._key(uri)
        if enabled:
            admin.enable_key(KeyId=key_id)
        else:
            admin.disable_key(KeyId=key_id)

    def destroy_key(self, uri: str) -> None:
        """Schedule the key's deletion (7 days): real KMS then refuses it as pending deletion."""
        admin, key_id = self._key(uri)
        admin.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)

    def settings(self) -> AwsKmsSettings:
        return AwsKmsSettings(
            endpoint_url=self.url,
            access_key_id=self._app_key_id,
            secret_access_key=SecretStr(self._app_secret),
        )

    def bad_settings(self) -> AwsKmsSettings:
        """The app's access key id with a wrong secret: KMS answers InvalidSignatureException."""
        return AwsKmsSettings(
            endpoint_url=self.url,
            access_key_id=self._app_key_id,
            secret_access_key=SecretStr("wrong-" + uuid.uuid4().hex),
        )

    def env(self) -> dict[str, str]:
        return {
            "KEYGATE_AWS_ENDPOINT_URL": self.url,
            "KEYGATE_AWS_ACCESS_KEY_ID": self._app_key_id,
            "KEYGATE_AWS_SECRET_ACCESS_KEY": self._app_secret,
        }

    # ------------------------------------------------------------------ the shim
    def _respond(self, request: FrontRequest, reply: FrontReply) -> FrontReply:
        action = request.headers.get("x-amz-target", "").rpartition(".")[2]
        if reply.status == 403 and reply.body.lstrip().startswith(b"<"):
            fields = dict(_XML_FIELD.findall(reply.body.decode("utf-8", "replace")))
            type_, message = _AUTH_REWRITE.get(fields.get("Code", ""), (None, None))
            if type_ is not None:
                return _error(type_, message or fields.get("Message", ""))
            return reply
        if action not in _STATEFUL:
            return reply
        try:
            answer = json.loads(reply.body or b"{}")
            asked = json.loads(request.body or b"{}")
        except ValueError:
            return reply
        error_type = str(answer.get("__type", "")).rpartition("#")[2]
        if action == "Decrypt" and error_type == "AccessDeniedException":
            reply = _error(
                "IncorrectKeyException",
                "The key ID in the request does not identify a KMS key that can perform "
                "this operation.",
            )
            error_type = "IncorrectKeyException"
        if reply.status != 200 and error_type not in _STATE_BEFORE:
            return reply
        match = _CREDENTIAL_REGION.search(request.headers.get("authorization", ""))
        region = match.group(1) if match else self.default_region
        refs = [asked.get("KeyId"), asked.get("DestinationKeyId")]
        refs += [answer.get("KeyId"), answer.get("SourceKeyId")]
        for ref in filter(None, refs):
            try:
                meta = self.admin(region).describe_key(KeyId=ref)["KeyMetadata"]
            except botocore.exceptions.ClientError:
                continue
            if meta["KeyState"] == "Disabled":
                return _error("DisabledException", f"{meta['Arn']} is disabled.")
            if meta["KeyState"] == "PendingDeletion":
                return _error("KMSInvalidStateException", f"{meta['Arn']} is pending deletion.")
        return reply
