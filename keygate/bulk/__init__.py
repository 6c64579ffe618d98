"""Bulk rewrap, re-encryption and provider migration over files and PostgreSQL tables.

See docs/bulk.md.  The CLI is ``keygate bulk …`` (:mod:`keygate.cli.bulk`).
"""

from keygate.bulk.engine import JobSummary, open_store, run_job
from keygate.bulk.spec import ContextRule, JobSpec, RunOptions
from keygate.bulk.store import JobRecord, JobStore, RecordError
from keygate.bulk.verify import VerifyResult, verify_job

__all__ = [
    "ContextRule",
    "JobRecord",
    "JobSpec",
    "JobStore",
    "JobSummary",
    "RecordError",
    "RunOptions",
    "VerifyResult",
    "open_store",
    "run_job",
    "verify_job",
]
