"""Local servers speaking the cloud KMS providers' real wire protocols (tests and the bench)."""
