"""Weight loading for jserve models: safetensors, GGUF, dummy init and a tensorstore cache."""
