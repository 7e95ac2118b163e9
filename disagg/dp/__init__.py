"""The engine-core process and data parallelism: the process loop (engine_process), the gloo
group with deadlines (group), lockstep waves (lockstep), the RPC whitelist (rpc), request
balancing (balance) and device assignment (devices)."""
