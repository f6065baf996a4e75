"""Collaboration of a small and a large model: speculative decoding, cascades, proxy-tuning,
contrastive decoding, judging, privacy shield."""
