"""Pre-training data: corpus readers, WordPiece tokenizers, binary shards and the masked-LM loader."""
