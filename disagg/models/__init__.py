"""Model definitions (the Llama family) and loading."""
