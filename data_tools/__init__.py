"""Data tools: pack corpora into Megatron's memory-mapped .bin/.idx token files and read them back as
ordered streams for memory models.  numpy only: no torch import anywhere in this package."""
