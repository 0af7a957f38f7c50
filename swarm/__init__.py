"""What peers and clients share: model families, checkpoint loading, wire encoding, DHT records, routing math."""

__version__ = "0.1.0"
