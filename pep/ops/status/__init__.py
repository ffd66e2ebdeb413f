"""``pep status``: the status document, its text, its socket and its Prometheus metrics."""
