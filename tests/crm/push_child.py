"""Run one push in a child process (crash tests): python -m tests.crm.push_child WH SPEC CRM URL RUN_ID FLUSH."""

from __future__ import annotations

import sys
from pathlib import Path

from opsloop.crm.runner import RunOptions, make_sink, push_destination
from opsloop.spec import load_spec
from opsloop.warehouse.duckdb import DuckDBAdapter
from sandbox.client import SandboxClient
from tests.crm.helpers import FAST


def main() -> None:
    wh_path, spec_path, crm, url, run_id, flush = sys.argv[1:7]
    from opsloop.crm.clients import hubspot_client, salesforce_client

    sbx = SandboxClient(url)
    spec = load_spec(Path(spec_path))
    dest = next(d for d in spec.reverse_etl() if d.crm == crm)
    client = (
        salesforce_client(url, sbx.salesforce_token) if crm == "salesforce" else hubspot_client(sbx.hubspot_token, url)
    )
    wh = DuckDBAdapter(wh_path)
    sink = make_sink(dest, client, str(dest.connection), spec, policy=FAST)
    run = RunOptions(run_id=run_id, flush_rows=int(flush))
    print(push_destination(wh, sink, dest, spec, run)["status"])


if __name__ == "__main__":
    main()
