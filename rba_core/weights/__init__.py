"""Model weights on disk: safetensors I/O, converters from other formats, the default models
(`rba prepare`) and `load_model`, one call for any supported checkpoint folder."""
