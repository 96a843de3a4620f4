"""The fault matrix: every fault injected under steady load, every call counted (scripts/faults.py).

results = asyncio.run(run_matrix(faults_named(None), server_args, LONG, hostile=corpus.everything))
print(markdown_table(results, command=..., when=..., machine=...))

_outcomes   the four outcomes of a call (ok, refused, client_error, lost), the Ledger, p99, recovery
_load       the steady load: the project's AsyncClient, retries off and on
_service    cbam-serve on a fixed port (one process, or workers), nginx in front of two replicas
_faults     the faults, a registry in the order they run
_fuzz       fuzzed protobuf bodies for every method the server lists by reflection (hypothesis)
_matrix     one fault under load (run_fault), all of them in turn (run_matrix), the two sizes
_report     the Markdown table of docs/RELIABILITY.md, and its place there
"""

from ._faults import FAULTS, Fault, FaultRun, HostileCase, Sizes, get_fault
from ._fuzz import Method, examples, fuzzed_bodies, served_methods
from ._matrix import LONG, SHORT, FaultResult, faults_named, matrix_server_args, run_fault, run_matrix
from ._outcomes import CATEGORIES, FAULT, POPULATIONS, RETRIES_OFF, RETRIES_ON, Ledger, Tally, categorise
from ._report import markdown_table, replace_table
from ._service import Balanced, Service, nginx_binary

__all__ = [
    "CATEGORIES",
    "FAULT",
    "FAULTS",
    "LONG",
    "POPULATIONS",
    "RETRIES_OFF",
    "RETRIES_ON",
    "SHORT",
    "Balanced",
    "Fault",
    "FaultResult",
    "FaultRun",
    "HostileCase",
    "Ledger",
    "Method",
    "Service",
    "Sizes",
    "Tally",
    "categorise",
    "examples",
    "faults_named",
    "fuzzed_bodies",
    "get_fault",
    "markdown_table",
    "matrix_server_args",
    "nginx_binary",
    "replace_table",
    "run_fault",
    "run_matrix",
    "served_methods",
]
