"""Prefect 3 flows that wire annotate -> train -> evaluate into one deployable DAG."""
