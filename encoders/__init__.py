"""encoders part of omnivox (imported as omnivox.encoders)."""
