"""What went wrong with an object store request, in the words a user acts on.

s3fs and gcsfs raise a mix of their own, botocore's, aiohttp's and Python's exceptions; each is
sorted here into one failure kind (``KINDS``) with a one-line message that says what to do.
Transient kinds are retried by :class:`ckptd.io.objstore.store.Store`; the others are reported.
"""

from __future__ import annotations

from collections.abc import Iterator

UNREACHABLE = "unreachable"  # no connection, reset, timed out: the server is down or far
THROTTLED = "throttled"  # 503 SlowDown, 429: the store asks us to slow down
SERVER = "server error"  # another 5xx
TRUNCATED = "truncated"  # a body shorter than its range or its Content-Length
DENIED = "denied"  # wrong or missing credentials, or no permission
MISSING_BUCKET = "missing bucket"
NOT_FOUND = "not found"  # an object (or prefix) that is not there
CHANGED = "changed"  # a read of one version (ETag, generation) found another, or none
MISSING_LIBRARY = "missing library"  # s3fs / gcsfs not installed
FAILED = "failed"  # anything else: reported as the library said it

CHANGED_TEXT = "the object was rewritten or deleted since it was listed; list it again"

KINDS = (
    UNREACHABLE,
    THROTTLED,
    SERVER,
    TRUNCATED,
    DENIED,
    MISSING_BUCKET,
    NOT_FOUND,
    CHANGED,
    MISSING_LIBRARY,
    FAILED,
)
TRANSIENT = frozenset({UNREACHABLE, THROTTLED, SERVER, TRUNCATED})

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
    "AccountProblem",
}


class StoreError(Exception):
    """An object store request that failed; ``kind`` is one of ``KINDS``, ``str()`` one line
    that names the URL and says what to do."""

    def __init__(self, kind: str, message: str, *, url: str = "", attempts: int = 1) -> None:
        self.kind, self.message, self.url, self.attempts = kind, message, url, attempts
        super().__init__(message)

    def __str__(self) -> str:
        return self.message

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT


class Truncated(Exception):
    """A body shorter than the range asked for, within the object's size (seen by the Store)."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: BaseException | None = exc
    while todo is not None and id(todo) not in seen:
        seen.add(id(todo))
        yield todo
        todo = todo.__cause__ or todo.__context__


def _http(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) of a botocore ClientError or a gcsfs HttpError, else (0, "")."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(response["Error"].get("Code") or "")
        if code.isdigit() and not status:
            status = int(code)
        return int(status), code
    number = getattr(exc, "code", None)  # gcsfs.retry.HttpError
    if isinstance(number, int) and type(exc).__name__ == "HttpError":
        return number, ""
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int) and type(exc).__name__.startswith("ClientResponse"):
        return status, ""
    return 0, ""


def _kind(exc: BaseException, bucket_request: bool) -> str:
    names = {type(e).__name__ for e in _chain(exc)}
    for e in _chain(exc):
        status, code = _http(e)
        # S3 answers 503 SlowDown, GCS 429 or 503 "backend error": back off from each.
        if code in _THROTTLE_CODES or status in (429, 503):
            return THROTTLED
        if status >= 500:
            return SERVER
        if status == 412 or code == "PreconditionFailed":
            return CHANGED
        if code in _DENIED_CODES or status in (401, 403):
            return DENIED
        if code == "NoSuchBucket" or (bucket_request and status == 404):
            return MISSING_BUCKET
        if status == 404 or code in ("NoSuchKey", "404"):
            return NOT_FOUND
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
        return DENIED  # none found: botocore and google-auth say so before any request
    if any(isinstance(e, Truncated) for e in _chain(exc)) or names & {
        "ClientPayloadError",
        "IncompleteRead",
        "IncompleteReadError",
    }:
        return TRUNCATED
    if names & {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientConnectionError",
        "HTTPClientError",
        "ProxyError",
        "FSTimeoutError",
    }:
        return UNREACHABLE
    for e in _chain(exc):
        if isinstance(e, ConnectionError | TimeoutError):  # socket's and asyncio's too
            return UNREACHABLE
        if isinstance(e, PermissionError) or str(e).startswith("Forbidden"):
            return DENIED
        if isinstance(e, FileNotFoundError):
            if "NoSuchBucket" in str(e) or "bucket does not exist" in str(e):
                return MISSING_BUCKET
            return MISSING_BUCKET if bucket_request else NOT_FOUND
    return FAILED


def classify(exc: BaseException, url: str, *, bucket_request: bool = False) -> StoreError:
    """The :class:`StoreError` for ``exc`` raised by a request about ``url``.

    ``bucket_request``: the request was about the bucket itself (a 404 then means no bucket).
    """
    if isinstance(exc, StoreError):
        return exc
    kind = _kind(exc, bucket_request)
    detail = _one_line(exc)
    scheme = url.partition("://")[0]
    bucket = url.partition("://")[2].split("/", 1)[0]
    if kind == DENIED:
        where = (
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            if scheme == "s3"
            else "GOOGLE_APPLICATION_CREDENTIALS or the gcloud login"
        )
        text = f"{url}: access denied ({detail}); check the credentials ({where}) and permissions"
    elif kind == MISSING_BUCKET:
        text = f"{url}: bucket {bucket} does not exist; create it or fix the path (and endpoint)"
    elif kind == UNREACHABLE:
        text = (
            f"{url}: the object store is unreachable ({detail}); check the endpoint "
            "(endpoint_url, AWS_ENDPOINT_URL or STORAGE_EMULATOR_HOST) and the network"
        )
    elif kind == THROTTLED:
        text = f"{url}: the object store is throttling requests ({detail}); raise poll_interval"
    elif kind == SERVER:
        text = f"{url}: the object store failed ({detail}); retried, it may recover"
    elif kind == TRUNCATED:
        text = f"{url}: a read came back shorter than asked ({detail}); retried"
    elif kind == CHANGED:
        text = f"{url}: {CHANGED_TEXT}"
    elif kind == NOT_FOUND:
        text = f"{url}: no such object"
    else:
        text = f"{url}: {detail}"
    return StoreError(kind, text, url=url)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
