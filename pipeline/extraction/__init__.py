"""Stage 1, images -> keys -> shards: the key specification and its compiled kernels, the code view's dictionary, the shard format, the collision audit, the stage itself."""
