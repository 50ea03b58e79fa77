"""Word/character error rates, latency, streaming simulation, reports and plots."""
