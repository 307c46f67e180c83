"""omnivox: streaming runtime for Thinker-Talker omni models."""
