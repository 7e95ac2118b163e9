"""One engine core: the scheduler (no torch), the block pool (the ledger of who owns each KV
block), KV sizing, the model runner with its sampler and CUDA/HIP graphs, requests, and the KV
connector interface (kv_connector) the engine calls; implementations live in ``connectors``."""
