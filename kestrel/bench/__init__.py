"""Benchmarks: `serving` drives an OpenAI-compatible server (`kestrel bench serve`);
`datasets` builds the seeded workloads."""
