"""The Batch API client: files, batches and their estimate."""
