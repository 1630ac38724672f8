"""The edgefleet device agent: detection on the edge, a durable outbox, MQTT publishing and OTA updates."""
