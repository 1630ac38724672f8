"""The edgefleet fleet manager: device registry, staged rollouts, REST API and dashboard."""
