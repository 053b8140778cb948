"""The toy world in one place: scenes, source, oracle annotators, exact verifiers, base model."""
