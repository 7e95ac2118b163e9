"""The leaf every other room imports: configuration (config), environment variables (envs),
platform facts (platform), the wire types shared across processes (protocol: frontend <->
engine core; kv_transfer_params: proxy <-> instances <-> connector; openai_api: request bodies;
sse: stream framing; registration: instance <-> proxy discovery), the tokenizer and the pause
states. It imports nothing from disagg outside itself."""
