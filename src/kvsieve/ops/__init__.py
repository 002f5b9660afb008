"""Shared tensor machinery: storage, attention, grouped (GQA) attention, scoring, RoPE, block memory. Written once,
used by every method."""
