"""Model definitions (one shared decoder, one file per family), the architecture registry and
the Hugging Face checkpoint loader. Entry points: `kestrel.models.loader`."""
