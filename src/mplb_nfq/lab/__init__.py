"""The lab: the paper's experiment in network namespaces, and the tools tests and benchmarks share.
Not needed by a production install (matplotlib is the `lab` extra)."""
