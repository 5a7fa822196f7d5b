"""The engine: audio in, a `Result` out, in one process (device manager, patches, model store,
transcriber and lock mode, fast paths, result and formats)."""
