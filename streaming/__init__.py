"""streaming part of omnivox (imported as omnivox.streaming)."""
