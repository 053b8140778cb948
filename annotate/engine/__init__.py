"""The Ray Data engine: plan a job, decode, run the operators, write shards and manifest."""
