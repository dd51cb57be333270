"""One module per golden case kind; each exposes `run(case: GoldenCase) -> list[numerics.Comparison]`."""
