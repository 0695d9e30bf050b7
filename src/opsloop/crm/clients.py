"""Client factories for the real vendor libraries, and the classifiers that map their errors.

* :func:`salesforce_client` — ``simple_salesforce.Salesforce`` from ``session_id`` +
  ``instance_url`` on a ``requests`` session with ``trust_env=False`` (so ``REQUESTS_CA_BUNDLE``
  cannot override ``verify``), a default timeout on every request, and — when the instance URL is
  ``http://`` (the loopback sandbox) — an adapter that turns the client's forced ``https://`` back
  into ``http://``. :func:`salesforce_oauth_client` first trades a refresh token for a session.
* :func:`hubspot_client` — ``hubspot.HubSpot`` with a ``host`` override and urllib3 retries
  switched off, because :func:`opsloop.crm.retry.call_with_retry` is the one retry policy.
* :func:`classify_salesforce` / :func:`classify_hubspot` turn vendor exceptions into
  :class:`~opsloop.crm.retry.VendorFailure` (transient / terminal / budget).

Vendor libraries are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter

from opsloop.crm.retry import VendorFailure, parse_retry_after
from opsloop.errors import ConfigError

if TYPE_CHECKING:
    from hubspot import HubSpot
    from simple_salesforce import Salesforce

DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 120.0)
SF_DEFAULT_VERSION = "59.0"


class CrmSession(requests.Session):
    """A requests session that remembers the headers of its last response (limit headers,
    ``Retry-After``), because simple-salesforce's exceptions do not carry them. Remembered per
    thread, so a call made on a worker thread (see ``SinkBase.pipelined``) reads its own."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False
        self._last = threading.local()
        self.hooks["response"].append(self._remember)

    @property
    def last_headers(self) -> Mapping[str, str]:
        return getattr(self._last, "headers", {})  # type: ignore[no-any-return]

    def _remember(self, resp: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        self._last.headers = resp.headers
        return resp


class _CrmAdapter(HTTPAdapter):
    """Default timeout on every request; optionally rewrite ``https://`` to ``http://``."""

    def __init__(self, timeout: tuple[float, float], to_http: bool = False) -> None:
        super().__init__(pool_connections=4, pool_maxsize=8, max_retries=0)
        self.timeout = timeout
        self.to_http = to_http

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        if self.to_http and request.url and request.url.startswith("https://"):
            request.url = "http://" + request.url[len("https://") :]
        return super().send(request, *args, **kwargs)


def crm_session(base_url: str, verify: bool | str = True, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> CrmSession:
    """A session for ``base_url``: timeouts everywhere, TLS verify honoured, http kept as http."""
    parsed = urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{base_url!r} is not an http(s) URL")
    session = CrmSession()
    session.verify = verify
    session.mount("https://", _CrmAdapter(timeout))
    session.mount("http://", _CrmAdapter(timeout))
    if parsed.scheme == "http":
        session.mount(f"https://{parsed.netloc}", _CrmAdapter(timeout, to_http=True))
    return session


def salesforce_client(
    instance_url: str,
    session_id: str,
    *,
    version: str = SF_DEFAULT_VERSION,
    verify: bool | str = True,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> Salesforce:
    """The real ``simple_salesforce.Salesforce`` for an instance URL and a session id (no request made)."""
    try:
        from simple_salesforce import Salesforce
    except ImportError as exc:  # pragma: no cover - core dependency
        raise ConfigError("Salesforce support needs simple-salesforce (pip install simple-salesforce)") from exc
    if not session_id:
        raise ConfigError("Salesforce session_id is empty")
    session = crm_session(instance_url, verify, timeout)
    return Salesforce(instance_url=instance_url.rstrip("/"), session_id=session_id, version=version, session=session)


def salesforce_oauth_client(
    login_url: str,
    client_id: str,
    client_secret: str,
    refresh_token: str,
    *,
    instance_url: str | None = None,
    version: str = SF_DEFAULT_VERSION,
    verify: bool | str = True,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> Salesforce:
    """Refresh-token grant at ``{login_url}/services/oauth2/token``, then :func:`salesforce_client`.

    ``instance_url`` (a sandbox base URL override) wins over the one the token endpoint returns."""
    session = crm_session(login_url, verify, timeout)
    resp = session.post(
        login_url.rstrip("/") + "/services/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "client_id": client_id,
            "client_secret": client_secret,
            "refresh_token": refresh_token,
        },
    )
    if resp.status_code != 200:
        try:
            err = resp.json()
            detail = f"{err.get('error')}: {err.get('error_description')}"
        except ValueError:
            detail = resp.text[:200]
        raise ConfigError(f"Salesforce OAuth refresh at {login_url} failed (HTTP {resp.status_code}): {detail}")
    body = resp.json()
    return salesforce_client(
        instance_url or body["instance_url"], body["access_token"], version=version, verify=verify, timeout=timeout
    )


def hubspot_client(
    access_token: str,
    base_url: str = "https://api.hubapi.com",
    *,
    verify: bool | str = True,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> HubSpot:
    """The real ``hubspot.HubSpot`` client for ``base_url`` with urllib3 retries off.

    Build each API object once (``client.crm.objects.batch_api``): every attribute access builds a
    new ApiClient and pool. The library has no default timeout: pass ``_request_timeout=`` on each
    call — :func:`hubspot_timeout` returns the one configured here.
    """
    try:
        from hubspot import HubSpot
        from urllib3.util.retry import Retry
    except ImportError as exc:  # pragma: no cover - core dependency
        raise ConfigError("HubSpot support needs hubspot-api-client (pip install hubspot-api-client)") from exc
    if not access_token:
        raise ConfigError("HubSpot access token is empty")
    no_retry = Retry(
        total=0,
        connect=0,
        read=0,
        redirect=0,
        status=0,
        other=0,
        respect_retry_after_header=False,
        raise_on_status=False,
    )
    kwargs: dict[str, Any] = {"access_token": access_token, "host": base_url.rstrip("/"), "retry": no_retry}
    if isinstance(verify, str):
        kwargs["ssl_ca_cert"] = verify
    elif not verify:
        kwargs["verify_ssl"] = False
    client = HubSpot(**kwargs)
    client.opsloop_timeout = timeout
    return client


def hubspot_timeout(client: Any) -> tuple[float, float]:
    """The ``_request_timeout`` to pass on calls of a client built by :func:`hubspot_client`."""
    return tuple(getattr(client, "opsloop_timeout", DEFAULT_TIMEOUT))  # type: ignore[return-value]


# -- error classification ------------------------------------------------------------------------


def _connection_failure(exc: BaseException) -> VendorFailure | None:
    import urllib3.exceptions as u3

    if isinstance(exc, requests.exceptions.SSLError) or (
        isinstance(exc, u3.MaxRetryError) and isinstance(exc.reason, u3.SSLError)
    ):
        return VendorFailure(False, None, "TLS_ERROR", str(exc)[:300])
    transient = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
        u3.HTTPError,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(exc, transient):
        return VendorFailure(True, None, "CONNECTION_ERROR", f"{type(exc).__name__}: {str(exc)[:300]}")
    return None


def classify_salesforce(session: requests.Session | None = None) -> Callable[[BaseException], VendorFailure | None]:
    """A classifier for simple-salesforce errors; ``session`` (a :class:`CrmSession`) supplies
    the ``Retry-After`` header the exception itself does not carry."""

    def classify(exc: BaseException) -> VendorFailure | None:
        from simple_salesforce.exceptions import SalesforceError

        if isinstance(exc, SalesforceError):
            status = int(exc.status)
            code, message = _sf_error(exc.content)
            headers = getattr(session, "last_headers", {}) or {}
            if status == 403 and code == "REQUEST_LIMIT_EXCEEDED":
                return VendorFailure(False, status, code, message, budget=True)
            if status == 429 or status >= 500:
                return VendorFailure(True, status, code, message, parse_retry_after(headers.get("Retry-After")))
            return VendorFailure(False, status, code, message)
        return _connection_failure(exc)

    return classify


def _sf_error(content: Any) -> tuple[str, str]:
    if isinstance(content, (bytes, str)):
        try:
            content = json.loads(content)
        except ValueError:
            return "UNKNOWN", str(content)[:300]
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return str(content[0].get("errorCode", "UNKNOWN")), str(content[0].get("message", ""))
    if isinstance(content, dict):
        return str(content.get("errorCode", content.get("error", "UNKNOWN"))), str(content.get("message", content))
    return "UNKNOWN", str(content)[:300]


def classify_hubspot(exc: BaseException) -> VendorFailure | None:
    """Classify a hubspot-api-client error (any package's ApiException, or a urllib3 error)."""
    status = getattr(exc, "status", None)
    if status is not None and hasattr(exc, "body") and hasattr(exc, "reason"):
        status = int(status)
        body: dict[str, Any] = {}
        try:
            parsed = json.loads(exc.body or "{}")
            body = parsed if isinstance(parsed, dict) else {}
        except (TypeError, ValueError):
            body = {}
        code = str(body.get("category") or body.get("errorType") or exc.reason or "ERROR")
        message = str(body.get("message") or exc.reason or exc)
        headers = getattr(exc, "headers", None) or {}
        if status == 429 and body.get("policyName") == "DAILY":
            return VendorFailure(False, status, "DAILY_LIMIT", message, budget=True)
        if status == 429 or status >= 500:
            code = str(body.get("policyName") or code) if status == 429 else code
            return VendorFailure(True, status, code, message, parse_retry_after(headers.get("Retry-After")))
        if status == 0:
            return VendorFailure(False, None, "CLIENT_ERROR", message)
        return VendorFailure(False, status, code, message)
    return _connection_failure(exc)
