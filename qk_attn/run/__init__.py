"""`qk-sniff run`: a whole dataset through a model, from a YAML config."""
