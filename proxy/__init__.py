"""The P/D proxy: one OpenAI-compatible front for pools of prefill and decode instances."""
