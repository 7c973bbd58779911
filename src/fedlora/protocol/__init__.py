"""The federated round, written once for both engines: server, client, round records, checkpoint, federation."""
