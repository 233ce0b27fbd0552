"""plait's training side: streaming loader, open_clip towers, objectives, the Accelerate loop, eval and export."""
