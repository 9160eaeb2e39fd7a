"""The Kafka transport: records of topics in, offsets committed after their outcome."""
