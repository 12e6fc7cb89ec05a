"""Operations: the config file, the control socket, health checks, metrics and status."""
