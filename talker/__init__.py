"""talker part of omnivox (imported as omnivox.talker)."""
