"""Model facts: hyperparameters from GGUF metadata (`config`) and the registry of known model files."""
