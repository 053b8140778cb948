"""Prefect 3 flows that wire annotate -> train -> evaluate into one deployable DAG."""

import os

# Without PREFECT_API_URL every run starts a temporary Prefect server, which Prefect waits 20 s
# for by default: about what it takes on an idle two-core machine (14 s measured), too little on
# a busy one (runs failed with "Timed out while attempting to connect to ephemeral Prefect API
# server"). A default only: the user's environment wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
