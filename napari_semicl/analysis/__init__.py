"""Review analyses (entropy maps, suggestions, embeddings); no Qt."""
