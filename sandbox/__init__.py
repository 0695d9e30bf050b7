"""A local stand-in for Salesforce (REST, sObject Collections, Bulk API 2.0) and HubSpot (CRM v3).

Run it with ``python -m sandbox serve --port P --state-dir DIR [--tls-cert C --tls-key K]``; drive it
from tests with :class:`sandbox.client.SandboxClient`. State lives in ``DIR/sandbox.sqlite3`` and
survives restarts. See ``docs/crm-sandbox.md`` for the wire behaviour it reproduces.
"""
