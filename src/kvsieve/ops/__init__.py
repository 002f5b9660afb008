"""Shared tensor machinery: storage, attention, scoring. Written once, used by every method."""
