"""Every on-disk form of a model, both directions: exports, the HF conversion, the model card, and the one reader of "a model at this path"."""
