"""What release pipelines need: stamping with provenance, content digests, Ed25519 signatures,
release manifests, and verification of all of them."""
