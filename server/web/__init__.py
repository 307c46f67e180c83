"""Static browser apps served by `omnivox serve`: voice chat at `/`, video-call assistant at `/call`."""
