"""What a user asks for beyond one prune: a latency searched by timing, a sweep of targets."""
