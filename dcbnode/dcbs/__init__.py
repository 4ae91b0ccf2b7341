"""The DCBS volume library (placeholder, filled in below)."""
