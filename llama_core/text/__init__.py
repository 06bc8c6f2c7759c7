"""Text in and out: the tokenizers (byte-level BPE, SentencePiece), pre-tokenization and chat templates."""
