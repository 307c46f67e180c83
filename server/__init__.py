"""server part of omnivox (imported as omnivox.server): `omnivox serve`, Realtime and chat completions."""
