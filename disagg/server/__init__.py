"""An instance's frontend: the engine client (ready handshake, death and stall detection), the
OpenAI-compatible API server and serving loop, admin endpoints, metrics, detokenization, the
``disagg serve`` main and the registrar that announces the instance to a proxy."""
