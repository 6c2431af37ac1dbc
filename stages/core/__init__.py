"""The shared core under the stage entry points: arguments, model loading, data, trainers, checkpoints, ranks."""
