"""KV connector implementations: the P/D connector (READ and WRITE modes, the transfer state
machine, control plane, fault injection) and its transports. The interface they implement, and
the registry that finds them by name, live with the engine (disagg/engine/kv_connector.py)."""
