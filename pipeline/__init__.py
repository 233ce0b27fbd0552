"""plait's training side: streaming loader, open_clip towers, objectives, the Accelerate loop, eval and export."""
import os

# Models and tokenizers come from files the user names, never from a hub: the Hugging Face libraries run offline
# in every plait process (set before any of them is imported, which reads these once), so a config naming a
# hub model fails instead of sending a request.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
