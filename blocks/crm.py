"""CRM credential blocks: client factories for Salesforce and HubSpot (secrets are ``SecretStr``)."""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from opsloop.errors import ConfigError


def _ref(block: Block) -> str:
    name = getattr(block, "_block_document_name", None) or "<unsaved>"
    return f"{block.get_block_type_slug()}/{name}"


def _verify(verify_tls: bool, ca_bundle: str | None) -> bool | str:
    return ca_bundle if ca_bundle else verify_tls


class SalesforceCredentials(Block):
    """Salesforce org access: a session id + instance URL, or a connected app's refresh token."""

    _block_type_name = "opsloop Salesforce"
    _block_type_slug = "opsloop-salesforce"
    _description = (
        "Salesforce credentials for opsloop (sources and reverse-ETL sinks). Either session_id + instance_url, or "
        "OAuth client_id/client_secret/refresh_token. get_client() builds a simple_salesforce.Salesforce."
    )

    instance_url: str | None = Field(default=None, description="Org instance URL, e.g. https://acme.my.salesforce.com.")
    session_id: SecretStr | None = Field(default=None, description="Session id / access token (Bearer).")
    client_id: SecretStr | None = Field(default=None, description="Connected app consumer key (OAuth refresh flow).")
    client_secret: SecretStr | None = Field(default=None, description="Connected app consumer secret.")
    refresh_token: SecretStr | None = Field(default=None, description="OAuth refresh token of the integration user.")
    login_url: str = Field(default="https://login.salesforce.com", description="OAuth host (test.salesforce.com …).")
    api_version: str = Field(default="59.0", description="REST API version, e.g. 59.0.")
    base_url: str | None = Field(
        default=None, description="Override for every request (local sandbox / tests): used as login and instance URL."
    )
    verify_tls: bool = Field(default=True, description="Verify TLS certificates.")
    ca_bundle: str | None = Field(default=None, description="Path of a CA bundle to trust (e.g. the sandbox cert).")
    timeout_seconds: float = Field(default=120.0, description="Read timeout per HTTP request, seconds.")

    @property
    def ref(self) -> str:
        return _ref(self)

    def get_client(self) -> Any:
        """A ``simple_salesforce.Salesforce`` (no request is made for session-id auth)."""
        from opsloop.crm.clients import salesforce_client, salesforce_oauth_client

        verify = _verify(self.verify_tls, self.ca_bundle)
        timeout = (10.0, float(self.timeout_seconds))
        if self.session_id is not None:
            url = self.base_url or self.instance_url
            if not url:
                raise ConfigError(f"block {self.ref}: instance_url (or base_url) is required with session_id")
            return salesforce_client(
                url, self.session_id.get_secret_value(), version=self.api_version, verify=verify, timeout=timeout
            )
        if self.client_id and self.client_secret and self.refresh_token:
            return salesforce_oauth_client(
                self.base_url or self.login_url,
                self.client_id.get_secret_value(),
                self.client_secret.get_secret_value(),
                self.refresh_token.get_secret_value(),
                instance_url=self.base_url,
                version=self.api_version,
                verify=verify,
                timeout=timeout,
            )
        raise ConfigError(
            f"block {self.ref}: set session_id (+ instance_url) or client_id, client_secret and refresh_token"
        )


class HubSpotCredentials(Block):
    """HubSpot portal access with a private-app token."""

    _block_type_name = "opsloop HubSpot"
    _block_type_slug = "opsloop-hubspot"
    _description = (
        "HubSpot private-app token for opsloop (sources and reverse-ETL sinks). get_client() builds a hubspot.HubSpot."
    )

    access_token: SecretStr = Field(description="Private app access token (pat-…).")
    base_url: str = Field(default="https://api.hubapi.com", description="API host; override for the local sandbox.")
    verify_tls: bool = Field(default=True, description="Verify TLS certificates.")
    ca_bundle: str | None = Field(default=None, description="Path of a CA bundle to trust (e.g. the sandbox cert).")
    timeout_seconds: float = Field(default=120.0, description="Read timeout per HTTP request, seconds.")

    @property
    def ref(self) -> str:
        return _ref(self)

    def get_client(self) -> Any:
        """A ``hubspot.HubSpot`` with urllib3 retries off (opsloop's retry policy wraps each call)."""
        from opsloop.crm.clients import hubspot_client

        return hubspot_client(
            self.access_token.get_secret_value(),
            self.base_url,
            verify=_verify(self.verify_tls, self.ca_bundle),
            timeout=(10.0, float(self.timeout_seconds)),
        )


SANDBOX_SF_SESSION = "00DSANDBOX!sandbox-session"
SANDBOX_HS_TOKEN = "pat-sandbox-token"  # noqa: S105 - the local sandbox's public test token


def local_crm_documents(sandbox_url: str) -> dict[str, Block]:
    """Block documents that point at the local CRM sandbox (``python -m sandbox serve``)."""
    return {
        "opsloop-salesforce/sandbox": SalesforceCredentials(
            instance_url=sandbox_url, base_url=sandbox_url, session_id=SecretStr(SANDBOX_SF_SESSION)
        ),
        "opsloop-hubspot/sandbox": HubSpotCredentials(access_token=SecretStr(SANDBOX_HS_TOKEN), base_url=sandbox_url),
    }
