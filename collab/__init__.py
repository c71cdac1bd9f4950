"""collab-vlm: entropy-gated, attention-guided collaborative edge-server VLM inference (no Ray here)."""
