"""Platform-neutral, model-neutral core of MuseSpark: events, intents, jobs, store, settings."""
