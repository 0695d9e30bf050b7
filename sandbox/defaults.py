"""What a fresh sandbox org / portal looks like: objects, fields, properties and settings.

Salesforce: ``Contact`` and ``Account`` with the standard fields a sync touches, ``LastName`` /
``Name`` required on create (as in a real org), and the AI fields the demo pipeline maps
(``Customer_Id__c`` is an external id). HubSpot: ``contacts``, ``companies``, ``deals`` with the
default properties; custom properties (``customer_id``, ``ai_churn_risk`` …) do not exist until a
client creates them, as in a real portal.
"""

from __future__ import annotations

from typing import Any

SALESFORCE = "salesforce"
HUBSPOT = "hubspot"

SF_SYSTEM = ("Id", "IsDeleted", "CreatedDate", "LastModifiedDate", "SystemModstamp")
SF_PREFIX = {"contact": "003", "account": "001", "lead": "00Q", "opportunity": "006"}


def sf_field(
    name: str,
    type_: str = "string",
    *,
    external_id: bool = False,
    required: bool = False,
    unique: bool = False,
    system: bool = False,
    picklist: list[str] | None = None,
    restricted: bool = False,
    length: int = 255,
) -> dict[str, Any]:
    return {
        "name": name,
        "type": type_,
        "label": name.replace("__c", "").replace("_", " "),
        "externalId": external_id,
        "idLookup": external_id or name == "Id",
        "unique": unique,
        "nillable": not required and name != "Id",
        "createable": not system,
        "updateable": not system,
        "defaultedOnCreate": system,
        "required": required,
        "custom": name.endswith("__c"),
        "length": length if type_ in ("string", "email", "phone", "picklist", "textarea") else 0,
        "picklistValues": [{"value": v, "label": v, "active": True} for v in (picklist or [])],
        "restrictedPicklist": restricted,
    }


def _sf_system() -> list[dict[str, Any]]:
    return [
        sf_field("Id", "id", system=True),
        sf_field("IsDeleted", "boolean", system=True),
        sf_field("CreatedDate", "datetime", system=True),
        sf_field("LastModifiedDate", "datetime", system=True),
        sf_field("SystemModstamp", "datetime", system=True),
    ]


def salesforce_objects() -> dict[str, list[dict[str, Any]]]:
    return {
        "Contact": [
            *_sf_system(),
            sf_field("FirstName"),
            sf_field("LastName", required=True),
            sf_field("Email", "email"),
            sf_field("Phone", "phone"),
            sf_field("AccountId", "reference"),
            sf_field("Customer_Id__c", external_id=True, unique=True),
            sf_field("AI_Churn_Risk__c", "double"),
            sf_field("AI_Next_Action__c"),
            sf_field("AI_Risk_Bucket__c"),
            sf_field("AI_Model_Version__c"),
            sf_field("AI_Scored_At__c", "datetime"),
        ],
        "Account": [
            *_sf_system(),
            sf_field("Name", required=True),
            sf_field("Industry"),
            sf_field("AnnualRevenue", "double"),
            sf_field("External_Id__c", external_id=True, unique=True),
        ],
    }


def hs_property(
    name: str,
    type_: str = "string",
    field_type: str = "text",
    *,
    unique: bool = False,
    read_only: bool = False,
    hubspot_defined: bool = True,
    options: list[dict[str, Any]] | None = None,
    group: str = "contactinformation",
    label: str | None = None,
    created: str = "2020-01-01T00:00:00.000Z",
) -> dict[str, Any]:
    return {
        "name": name,
        "label": label or name.replace("_", " ").title(),
        "type": type_,
        "fieldType": field_type,
        "groupName": group,
        "description": "",
        "options": options or [],
        "displayOrder": -1,
        "calculated": False,
        "externalOptions": False,
        "hasUniqueValue": unique,
        "hidden": False,
        "hubspotDefined": hubspot_defined,
        "modificationMetadata": {
            "archivable": not hubspot_defined,
            "readOnlyDefinition": hubspot_defined,
            "readOnlyValue": read_only,
        },
        "formField": not read_only,
        "createdAt": created,
        "updatedAt": created,
        "archived": False,
    }


def _hs_system(group: str) -> list[dict[str, Any]]:
    return [
        hs_property("hs_object_id", "number", "number", read_only=True, group=group, label="Record ID"),
        hs_property("createdate", "datetime", "date", read_only=True, group=group, label="Create Date"),
        hs_property("lastmodifieddate", "datetime", "date", read_only=True, group=group, label="Last Modified Date"),
        hs_property("hs_lastmodifieddate", "datetime", "date", read_only=True, group=group, label="Last Modified"),
    ]


def hubspot_objects() -> dict[str, list[dict[str, Any]]]:
    stages = [
        {"label": s.title(), "value": s, "displayOrder": i, "hidden": False}
        for i, s in enumerate(["subscriber", "lead", "opportunity", "customer"])
    ]
    return {
        "contacts": [
            *_hs_system("contactinformation"),
            hs_property("email", label="Email"),
            hs_property("firstname", label="First Name"),
            hs_property("lastname", label="Last Name"),
            hs_property("phone", label="Phone Number"),
            hs_property("company", label="Company Name"),
            hs_property("lifecyclestage", "enumeration", "radio", options=stages, label="Lifecycle Stage"),
        ],
        "companies": [
            *_hs_system("companyinformation"),
            hs_property("name", group="companyinformation", label="Company name"),
            hs_property("domain", group="companyinformation", label="Company Domain Name"),
        ],
        "deals": [
            *_hs_system("dealinformation"),
            hs_property("dealname", group="dealinformation", label="Deal Name"),
            hs_property("amount", "number", "number", group="dealinformation", label="Amount"),
            hs_property("dealstage", group="dealinformation", label="Deal Stage"),
        ],
    }


# readable defaults; the CLI (`python -m sandbox serve --…`) and /__control/settings override them
DEFAULT_SETTINGS: dict[str, Any] = {
    "salesforce_daily_limit": 100_000,
    "hubspot_daily_limit": 250_000,
    "hubspot_ten_second_limit": 190,
    # the rolling window's length (X-HubSpot-RateLimit-Interval-Milliseconds): HubSpot's is 10 s; tests shorten it
    "hubspot_rate_window_ms": 10_000,
    # Retry-After on a TEN_SECONDLY_ROLLING 429: no HubSpot document says it is sent (the CRM wire contract)
    "hubspot_retry_after": True,
    "bulk_inprogress_polls": 1,
    "query_batch_size": 2000,
    "salesforce_tokens": ["00DSANDBOX!sandbox-session"],
    "hubspot_tokens": ["pat-sandbox-token"],
    "oauth_refresh_tokens": [],
    "api_version_min": 46.0,
}


def seed_values(vendor: str, obj: str, i: int) -> dict[str, Any]:
    """Plausible field values for seeded record number ``i``."""
    o = obj.lower()
    if vendor == SALESFORCE and o == "contact":
        return {
            "FirstName": f"First{i}",
            "LastName": f"Last{i}",
            "Email": f"contact{i}@example.com",
            "Customer_Id__c": f"C{i:07d}",
        }
    if vendor == SALESFORCE and o == "account":
        return {"Name": f"Account {i}", "External_Id__c": f"A{i:07d}"}
    if vendor == HUBSPOT and o == "contacts":
        return {"email": f"contact{i}@example.com", "firstname": f"First{i}", "lastname": f"Last{i}"}
    if vendor == HUBSPOT and o == "companies":
        return {"name": f"Company {i}", "domain": f"company{i}.example.com"}
    if vendor == HUBSPOT and o == "deals":
        return {"dealname": f"Deal {i}", "amount": str(1000 + i)}
    return {}
