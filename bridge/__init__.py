"""mqtt-bridge: an async MQTT republish bridge with end-to-end at-least-once delivery."""

__version__ = "0.1.0"
