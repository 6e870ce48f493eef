"""Record retrieval: the RecordSource seam and its implementations."""
