"""Row transforms between extract and load: quality gates, PII masking/hashing, dedup by key."""
