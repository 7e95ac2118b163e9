"""The KV connector layer: base interfaces, the P/D connector, transports."""
