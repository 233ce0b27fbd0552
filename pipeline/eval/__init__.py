"""Zero-shot, retrieval and linear-probe evaluation, evaluation datasets, and fine-tuning."""
