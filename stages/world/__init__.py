"""The demo world: a generated set of facts, the datasets and tiny models built from it."""
