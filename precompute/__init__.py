"""`kdtargets`: the precompute stage. Reads a corpus, runs the AR teacher, writes sparse soft-target shards."""
