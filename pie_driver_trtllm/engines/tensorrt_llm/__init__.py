"""The TensorRT-LLM engine: start-up checks, then the generate or pyexecutor mode."""
