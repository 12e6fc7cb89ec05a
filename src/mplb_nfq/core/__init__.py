"""The pure core: bytes, marks and times in, decisions out. Nothing here does I/O or reads a clock;
the kernel adapters and the worker feed it."""
