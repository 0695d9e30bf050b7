"""Pure parts of the reverse ETL: payload hashing, the significance rule, the retry policy, CSV
values, gate verdicts, the sandbox's SOQL subset and timestamp formats."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest

from opsloop.crm.base import BatchResult, BudgetCapReached, SinkBase
from opsloop.crm.diff import jsonable, payload_hash, significant
from opsloop.crm.retry import CrmBudgetExhausted, RetryPolicy, RetryStats, VendorFailure, call_with_retry
from opsloop.crm.salesforce import _csv_value
from opsloop.errors import TerminalError, TransientError
from sandbox import soql
from sandbox.util import hs_time, parse_sf_datetime, parse_ts, sf_id, sf_time


def test_encode_batch_gives_the_canonical_text_and_hash_of_each_payload() -> None:
    """The column-at-a-time encoder (floats through Arrow's cast) writes, row for row, what
    ``json.dumps`` of the payload dict writes, and hashes it the same — floats of every magnitude
    (repr() switches to an exponent at 1e16, Arrow at 1e10), -0.0, NaN, ±inf and nulls included."""
    import random
    import struct

    import duckdb

    from opsloop.crm.base import FieldSpec
    from opsloop.crm.payload import duckdb_hasher, encode_batch, payload_json

    rnd = random.Random(5)
    scores: list[float | None] = [None, float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-4, 9.99e-05, 1e10]
    scores += [9999999999.999998, 1e16, 5e-324, 1.7976931348623157e308, 100.0, 0.1, -3.0]
    scores += [rnd.random() * 10.0 ** rnd.randint(-12, 20) * rnd.choice((1, -1)) for _ in range(3000)]
    scores += [round(rnd.random(), rnd.randint(0, 8)) for _ in range(3000)]
    scores += [struct.unpack("<d", struct.pack("<Q", rnd.getrandbits(64)))[0] for _ in range(3000)]
    n = len(scores)
    at = datetime(2026, 11, 28, 3, 4, 5, 123456, tzinfo=UTC)
    table = pa.table(
        {
            "score": pa.array(scores, pa.float64()),
            "score32": pa.array([s if s is None or abs(s) < 1e30 else None for s in scores], pa.float32()),
            "action": pa.array([rnd.choice(["call", 'say "hi"', "é", None]) for _ in range(n)]),
            "flag": pa.array([rnd.choice([True, False, None]) for _ in range(n)]),
            "count": pa.array([rnd.choice([None, 0, -7, 2**40]) for _ in range(n)], pa.int64()),
            "scored_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
        }
    )
    fields = [
        FieldSpec("score", "ai_score", "number"),
        FieldSpec("score32", "ai_score32", "number"),
        FieldSpec("action", "ai_action", "enumeration"),
        FieldSpec("flag", "ai_flag", "bool"),
        FieldSpec("count", "ai_count", "number"),
        FieldSpec("scored_at", "ai_scored_at", "datetime"),
    ]
    texts, hashes, _ = encode_batch(table, fields, duckdb_hasher(duckdb.connect(), min_rows=1))
    rows = table.to_pylist()
    want = [
        payload_json({f.crm_name: jsonable(r[f.column]) for f in fields}) for r in rows
    ]  # json.dumps: NaN and inf are null once jsonable has seen them
    assert texts.to_pylist() == want
    assert hashes.to_pylist() == [payload_hash({}, text=t) for t in want]


def test_payload_hash_is_order_independent_and_value_sensitive() -> None:
    a = payload_hash({"x": 0.5, "y": "call"})
    assert a == payload_hash({"y": "call", "x": 0.5}) and len(a) == 32
    assert a != payload_hash({"x": 0.5000001, "y": "call"})
    assert jsonable(datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"
    assert jsonable(float("nan")) is None


@pytest.mark.parametrize(
    ("new", "bucket_changed", "expected"),
    [
        ({"risk": 0.51, "act": "call"}, False, False),  # jitter below minDelta
        ({"risk": 0.56, "act": "call"}, False, True),  # |Δ| ≥ minDelta
        ({"risk": 0.51, "act": "call"}, True, True),  # bucket change always counts
        ({"risk": 0.50, "act": "mail"}, False, True),  # a non-score field changed
        ({"risk": None, "act": "call"}, False, True),  # cleared
    ],
)
def test_significance_rule(new: dict, bucket_changed: bool, expected: bool) -> None:
    prev = {"risk": 0.50, "act": "call"}
    assert significant(new, prev, {"risk"}, 0.05, bucket_changed) is expected


def _classify(exc: BaseException) -> VendorFailure | None:
    if isinstance(exc, KeyError):
        return VendorFailure(True, 429, "RATE", "slow down", retry_after=float(exc.args[0]))
    if isinstance(exc, ValueError):
        return VendorFailure(False, 400, "BAD", "no such field Foo__c")
    if isinstance(exc, LookupError):
        return VendorFailure(False, 403, "REQUEST_LIMIT_EXCEEDED", "spent", budget=True)
    return None


def test_call_with_retry_honours_retry_after_and_caps_it() -> None:
    slept: list[float] = []
    errors = [KeyError(3), KeyError(500)]

    def fn() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    stats = RetryStats()
    policy = RetryPolicy(retry_after_cap=60)
    assert (
        call_with_retry(fn, _classify, what="x", block="b", vendor="V", policy=policy, stats=stats, sleep=slept.append)
        == "ok"
    )
    assert slept == [3.0, 60.0] and stats.calls == 3 and stats.retries == 2


def test_call_with_retry_terminal_budget_and_exhaustion() -> None:
    def bad() -> None:
        raise ValueError

    with pytest.raises(TerminalError, match=r"^blk: V upsert failed: HTTP 400 BAD: no such field Foo__c$"):
        call_with_retry(bad, _classify, what="upsert", block="blk", vendor="V", sleep=lambda _: None)

    def spent() -> None:
        raise LookupError

    with pytest.raises(CrmBudgetExhausted):
        call_with_retry(spent, _classify, what="x", block="b", vendor="V", sleep=lambda _: None)

    def always() -> None:
        raise KeyError(0)

    with pytest.raises(TransientError, match="still failing after 3 attempt"):
        call_with_retry(
            always, _classify, what="x", block="b", vendor="V", policy=RetryPolicy(max_attempts=3), sleep=lambda _: None
        )
    with pytest.raises(RuntimeError):  # not a vendor error: propagates untouched
        call_with_retry(lambda: (_ for _ in ()).throw(RuntimeError()), _classify, what="x", block="b", vendor="V")


def test_backoff_grows_and_is_capped() -> None:
    p = RetryPolicy(base_delay=1, max_delay=5, jitter=0)
    assert [p.delay(a, None) for a in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]


def test_bulk_csv_values() -> None:
    assert [_csv_value(v) for v in (None, "", True, 0.1, "a,b", 3)] == ["#N/A", "#N/A", "true", "0.1", "a,b", "3"]


def test_soql_subset() -> None:
    q = soql.parse(
        "SELECT Id, Email FROM Contact WHERE SystemModstamp > 2026-01-01T00:00:00Z AND Name LIKE 'a%' "
        "AND Id IN ('1','2') ORDER BY SystemModstamp DESC LIMIT 5 OFFSET 1"
    )
    assert q.fields == ["Id", "Email"] and q.obj == "Contact" and q.limit == 5 and q.offset == 1
    assert [(c.field, c.op) for c in q.where] == [("SystemModstamp", ">"), ("Name", "LIKE"), ("Id", "IN")]
    assert q.order == [("SystemModstamp", True)]
    assert soql.matches({"Name": "Alice"}, [soql.Cond("Name", "LIKE", "a%")])
    with pytest.raises(soql.SoqlError, match="OR is not supported"):
        soql.parse("SELECT Id FROM Contact WHERE A = 1 OR B = 2")
    with pytest.raises(soql.SoqlError, match="relationship"):
        soql.parse("SELECT Account.Name FROM Contact")


def test_sandbox_time_formats_and_ids() -> None:
    ms = parse_ts("2026-01-02T03:04:05.123+01:00")
    assert sf_time(ms) == "2026-01-02T02:04:05.123+0000" and hs_time(ms) == "2026-01-02T02:04:05.123Z"
    assert parse_ts("1767398400000") == 1767398400000 and parse_ts("2026-01-03") == 1767398400000
    with pytest.raises(ValueError, match="xsd:dateTime"):
        parse_sf_datetime("2026-01-02 03:04:05+00:00")  # simple-salesforce's bulk2 format is rejected
    ids = {sf_id("003", i) for i in range(1, 2000)}
    assert len(ids) == 1999 and all(len(i) == 18 and i.startswith("003") for i in ids)


class _Pipe(SinkBase):
    """A sink whose 'CRM' is a function: records how many sends overlap."""

    vendor = "Test"

    def __init__(self, fail_at: int | None = None, delay: float = 0.01) -> None:
        super().__init__("blk", "obj", "ext")
        self.fail_at, self.delay = fail_at, delay
        self.active = self.peak = 0
        self.sent: list[int] = []
        self.finished: list[int] = []
        self.lock = threading.Lock()

    def send(self, t: pa.Table, body: int) -> int:
        def call() -> int:
            with self.lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
                self.sent.append(body)
            try:
                time.sleep(self.delay * (2 if body % 2 == 0 else 1))  # answers arrive out of order
                if body == self.fail_at:
                    raise TerminalError(f"request {body} failed")
                return body
            finally:
                with self.lock:
                    self.active -= 1
                    self.finished.append(body)

        self.claim_call()
        return call_with_retry(call, lambda e: None, what="t", block="b", vendor="v", stats=self.stats, counted=True)

    def results(self, n: int, depth: int) -> Iterator[int]:
        chunks = [pa.table({"i": [i]}) for i in range(n)]

        def parse(t: pa.Table, answer: Any) -> BatchResult:
            assert t.column("i")[0].as_py() == answer  # each answer is parsed with its own chunk
            return BatchResult(t, ["updated"], [None], [None], [None])

        build = lambda t: int(t.column("i")[0].as_py())  # noqa: E731
        for r in self.pipelined(chunks, build, self.send, parse, depth):
            yield r.rows.column("i")[0].as_py()

    def run(self, n: int, depth: int) -> list[int]:
        return list(self.results(n, depth))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_pipelined_keeps_order_and_depth(depth: int) -> None:
    sink = _Pipe()
    assert sink.run(9, depth) == list(range(9))
    assert sink.peak <= depth and (depth == 1 or sink.peak > 1) and sink.stats.calls == 9


def test_pipelined_error_waits_for_calls_in_flight() -> None:
    sink = _Pipe(fail_at=3)
    got: list[int] = []
    with pytest.raises(TerminalError, match="request 3 failed"):
        for i in sink.results(9, 2):
            got.append(i)
    assert got == [0, 1, 2]  # every result before the failed request was handed back, in order
    assert sink.active == 0 and sorted(sink.finished) == sorted(sink.sent)  # nothing left running
    assert max(sink.sent) <= 4  # at most depth - 1 requests were sent beyond the failed one


def test_pipelined_consumer_stopping_early_waits_for_calls_in_flight() -> None:
    sink = _Pipe()
    gen = sink.results(9, 3)
    assert next(gen) == 0
    gen.close()
    assert sink.active == 0 and sorted(sink.finished) == sorted(sink.sent) and len(sink.sent) <= 4


def test_pipelined_budget_is_never_exceeded() -> None:
    sink = _Pipe(delay=0.005)
    sink.call_budget = 5
    with pytest.raises(BudgetCapReached):
        sink.run(9, 3)
    assert sink.stats.calls == 5 and sorted(sink.sent) == [0, 1, 2, 3, 4] and sink.active == 0


def test_collections_records_are_built_by_arrow_as_the_json_of_their_values() -> None:
    """The Collections body is joined from per-row JSON texts Arrow builds column-wise; parsed, it is
    exactly the records a dict per row would give (floats round-trip, strings escaped, nulls null),
    and the external id wins over a mapped field of the same name (any case)."""
    import math
    import random

    import orjson

    from opsloop.crm.payload import VALUE_PREFIX
    from opsloop.crm.salesforce import SalesforceSink

    rnd = random.Random(7)
    n = 2000
    scores = [rnd.random() * 10.0 ** rnd.randint(-12, 20) * rnd.choice((1, -1)) for _ in range(n - 4)]
    scores += [float("nan"), float("inf"), 0.0, 1e16]
    texts = [rnd.choice(["call", 'say "hi"', "é", "back\\slash", "tab\there", None]) for _ in range(n)]
    ids = [f"C{i:05d}" if i % 7 else f'Q"{i}é' for i in range(n)]
    sink = SalesforceSink.__new__(SalesforceSink)  # only the body building: no client needed
    sink.object, sink.external_id_field = "Contact", "Customer_Id__c"
    sink.columns = ["AI_Churn_Risk__c", "AI_Next_Action__c", "Flag__c", "N__c", "customer_id__c"]
    table = pa.table(
        {
            "external_id": ids,
            VALUE_PREFIX + "AI_Churn_Risk__c": pa.array(scores, pa.float64()),
            VALUE_PREFIX + "AI_Next_Action__c": texts,
            VALUE_PREFIX + "Flag__c": [rnd.choice([True, False, None]) for _ in range(n)],
            VALUE_PREFIX + "N__c": pa.array([rnd.choice([None, 0, -7, 2**40]) for _ in range(n)], pa.int64()),
            VALUE_PREFIX + "customer_id__c": ["twin"] * n,
        }
    )
    (staged,) = list(sink._with_records([table]))
    body = orjson.loads(sink._collection_body(staged.slice(0, n)))
    assert body["allOrNone"] is False
    want = [
        {
            "attributes": {"type": "Contact"},
            "AI_Churn_Risk__c": None if math.isnan(s) or math.isinf(s) else s,
            "AI_Next_Action__c": t,
            "Flag__c": f,
            "N__c": k,
            "Customer_Id__c": i,
        }
        for s, t, f, k, i in zip(
            scores,
            texts,
            table.column(VALUE_PREFIX + "Flag__c").to_pylist(),
            table.column(VALUE_PREFIX + "N__c").to_pylist(),
            ids,
            strict=True,
        )
    ]
    assert body["records"] == want
