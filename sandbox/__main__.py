"""``python -m sandbox serve --port P --state-dir DIR [--tls-cert C --tls-key K] [limits…]``
``python -m sandbox cert DIR`` writes a self-signed loopback certificate."""

from __future__ import annotations

import argparse
import gc
import logging
from pathlib import Path
from typing import Any

GRACE_S = 2  # seconds a stopping sandbox gives requests in flight


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="serve the Salesforce + HubSpot sandbox")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--state-dir", type=Path, required=True)
    serve.add_argument("--tls-cert", type=Path)
    serve.add_argument("--tls-key", type=Path)
    serve.add_argument("--salesforce-daily-limit", type=int)
    serve.add_argument("--hubspot-daily-limit", type=int)
    serve.add_argument("--hubspot-ten-second-limit", type=int, help="0 disables the ten-secondly window")
    serve.add_argument("--bulk-inprogress-polls", type=int)
    serve.add_argument("--log-level", default="warning")
    cert = sub.add_parser("cert", help="write a self-signed certificate for 127.0.0.1")
    cert.add_argument("directory", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "cert":
        from sandbox.tls import make_self_signed

        print(*make_self_signed(args.directory))
        return
    import uvicorn

    from sandbox.app import create_app

    overrides: dict[str, Any] = {
        k: getattr(args, k)
        for k in ("salesforce_daily_limit", "hubspot_daily_limit", "hubspot_ten_second_limit", "bulk_inprogress_polls")
        if getattr(args, k) is not None
    }
    logging.basicConfig(level=args.log_level.upper())
    app = create_app(args.state_dir, overrides)
    if overrides:
        app.state.sandbox.update_settings(overrides)
    tls: dict[str, Any] = {}
    # A batch request allocates a few objects per record (decoded bodies, records, results), none
    # of them cyclic: the startup heap is frozen out of the collector and the young generation is
    # collected less often, so a 10,000-row Bulk batch does not walk the whole heap repeatedly.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    if args.tls_cert and args.tls_key:
        tls = {"ssl_certfile": str(args.tls_cert), "ssl_keyfile": str(args.tls_key)}
    # On SIGTERM, uvicorn closes idle keep-alive connections and waits for them to go. A TLS close
    # waits for the peer's close_notify, which a client holding a pooled connection never sends, so
    # a TLS sandbox waited until its parent killed it (10 s in SandboxServer.stop) and skipped the
    # lifespan shutdown that flushes its state. Requests in flight get GRACE_S to finish.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=GRACE_S,
        **tls,
    )


if __name__ == "__main__":
    main()
