"""thinker part of omnivox (imported as omnivox.thinker)."""
